"""``mmray`` command line: parse, call the library, map errors to exit codes (0 ok, 2 bad input, 1 failure)."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from mmray.config.errors import RunError, UserError, find_error, wrapped_errors

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

# verb modules, each with register(subparsers) -> None; imported lazily so `mmray --help` is fast. Each verb
# imports the library inside its run() for the same reason (the one place function-level imports need no comment).
VERBS = ("data", "validate", "render_config", "ls", "train", "tune", "report", "evaluate", "predict",
         "export", "submit", "jobs")


VERBOSE_HELP = "show debug logs and, on a failure, the full traceback (also accepted after the verb)"


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
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
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
    # SUPPRESS: `mmray VERB` without it keeps what `mmray --verbose VERB` set
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return p


def root_error(e: BaseException) -> BaseException:
    """The error to show for ``e``: the first mmray error (:class:`UserError`, :class:`RunError`) it wraps,
    as raised (not Ray's re-raised copy); else the innermost exception of its first chain."""
    found = find_error(e, (UserError, RunError))
    if found is not None:
        return found
    innermost, seen = e, {id(e)}
    while (inner := wrapped_errors(innermost)) and id(inner[0]) not in seen:
        innermost = inner[0]
        seen.add(id(innermost))
    return innermost


def _ray_logs() -> str | None:
    """Where this process's Ray session writes its logs, if Ray was started here."""
    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            return ray._private.worker._global_node.get_logs_dir_path()
    except Exception:  # noqa: BLE001 - a hint only
        return None
    return None


def report_failure(e: BaseException, *, verbose: bool) -> int:
    """Print one ``mmray:`` line for ``e`` (the full traceback first with ``verbose``); returns the exit code."""
    import traceback

    if verbose:
        traceback.print_exception(e, file=sys.stderr)
    cause = root_error(e)
    if isinstance(cause, UserError):
        print(f"mmray: {cause}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(cause, RunError):
        print(f"mmray: {cause}", file=sys.stderr)
    else:
        print(f"mmray: {type(cause).__name__}: {cause}", file=sys.stderr)
    if not verbose:
        logs = _ray_logs()
        print("mmray: run again with --verbose for the full traceback" + (f"; Ray's logs are in {logs}" if logs else ""),
              file=sys.stderr)
    return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    from mmray.runtime import set_verbose

    set_verbose(args.verbose)  # Ray workers' tracebacks reach the terminal only with --verbose
    try:
        code = args.run(args)
    except UserError as e:
        if args.verbose:
            import traceback

            traceback.print_exception(e, file=sys.stderr)
        print(f"mmray: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("mmray: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a failure at run time: one line naming the cause; the traceback with --verbose
        return report_failure(e, verbose=args.verbose)
    return EXIT_OK if code is None else code


if __name__ == "__main__":
    sys.exit(main())
