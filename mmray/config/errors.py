"""Errors a user can fix. The CLI maps :class:`UserError` to exit status 2."""
from __future__ import annotations


class UserError(Exception):
    """Bad usage, config or data: nothing was started. ``str(e)`` is the whole message."""


class RunError(Exception):
    """A failure at run time whose message says it all (a bad record under ``on_bad_record: fail``).

    The CLI prints ``str(e)`` as one line and exits 1; the traceback only with ``--verbose``. It may
    reach the driver wrapped by Ray (a worker's or a data task's failure): the CLI unwraps it.
    """


class ConfigError(UserError):
    """One or more problems in a job or space config, each naming its dotted key."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        head = f"invalid config {source}" if source else "invalid config"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in problems))

    def __reduce__(self):  # pickles across Ray workers
        return (type(self), (self.problems, self.source))
