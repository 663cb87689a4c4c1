import argparse
import sys

from . import e2e


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastlars.bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    e2e.add_arguments(sub.add_parser("e2e", help=e2e.__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    if args.command == "e2e":
        e2e.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
