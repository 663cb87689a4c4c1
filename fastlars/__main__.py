"""``python -m fastlars``: this installation's versions, device and backends, for bug reports."""

import argparse
import json
import sys

from ._cuda_toolkit import cuda_toolkit
from ._info import info, render


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastlars", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--cuda-home", action="store_true",
                        help="print only the CUDA toolkit a build would use (why on stderr; exit 1 if none): "
                             "CUDA_HOME or CUDA_PATH if it is a toolkit, else /usr/local/cuda, else the "
                             "toolkit behind nvcc on PATH")
    args = parser.parse_args(argv)
    if args.cuda_home:
        toolkit = cuda_toolkit()
        print(toolkit, file=sys.stderr)
        print(toolkit.home or "")
        sys.exit(0 if toolkit.home else 1)
    report = info()
    print(json.dumps(report, indent=2) if args.json else render(report))


if __name__ == "__main__":
    main()
