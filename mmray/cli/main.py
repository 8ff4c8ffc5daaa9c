"""``mmray`` command line: parse, call the library, map errors to exit codes (0 ok, 2 bad input, 1 failure)."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from mmray.config.errors import UserError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

# verb modules, each with register(subparsers) -> None; imported lazily so `mmray --help` is fast. Each verb
# imports the library inside its run() for the same reason (the one place function-level imports need no comment).
VERBS = ("data", "validate", "render_config", "ls", "train", "tune", "report", "evaluate", "predict",
         "export", "submit", "jobs")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own exit code is 2 too; keep its usage line
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"mmray: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = _Parser(
        prog="mmray",
        description="Train and sweep multimodal (image + text + audio) fusion models on Ray.",
        epilog="example:\n  mmray data synth --out data/synth\n  mmray train jobs/quickstart.yaml\n"
        "run `mmray VERB --help` for each verb's options and examples.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs and tracebacks")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True
    for verb in VERBS:
        importlib.import_module(f"mmray.cli.{verb}").register(sub)
    return parser


def add_verb(sub, name: str, *, help: str, example: str, run: Callable[[argparse.Namespace], int | None]):
    """A subcommand whose ``--help`` ends with a copyable example."""
    p = sub.add_parser(name, help=help, description=help, epilog=f"example:\n  {example}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(run=run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        code = args.run(args)
    except UserError as e:
        print(f"mmray: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("mmray: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a failure at run time: say what, keep the traceback for --verbose
        if args.verbose:
            raise
        print(f"mmray: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK if code is None else code


if __name__ == "__main__":
    sys.exit(main())
