"""``python -m fastlars``: this installation's versions, device and backends, for bug reports."""

import argparse
import json

from ._info import info, render


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastlars", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = info()
    print(json.dumps(report, indent=2) if args.json else render(report))


if __name__ == "__main__":
    main()
