"""Errors a user can fix. The CLI maps :class:`UserError` to exit status 2. Imports nothing from mmray:
every layer may raise them (also as :mod:`mmray.config.errors`)."""
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


def wrapped_errors(error: BaseException) -> list[BaseException]:
    """The exceptions ``error`` wraps: Ray Train's worker failures (``worker_failures``, each in a
    ``UserExceptionWithTraceback`` holding ``_base_exc``) and controller failure, a Ray task error's
    ``cause``, and ``raise ... from`` causes. Plain attributes: no Ray import."""
    found = [getattr(error, "_base_exc", None), getattr(error, "cause", None),
             getattr(error, "controller_failure", None)]
    failures = getattr(error, "worker_failures", None)
    if isinstance(failures, dict):
        found += [failures[k] for k in sorted(failures)]
    found.append(error.__cause__)
    return [e for e in found if isinstance(e, BaseException) and e is not error]


def find_error(error: BaseException | None, kinds) -> BaseException | None:
    """The first ``kinds`` exception inside ``error`` (itself included), breadth first through Ray's wrappers
    (see :func:`wrapped_errors`), as it was raised: a Ray task error that merely poses as its cause's class
    is looked through, so ``str()`` is mmray's message, not Ray's traceback. None when there is none."""
    queue, seen = [error], set()
    while queue:
        e = queue.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        ray_copy = isinstance(getattr(e, "cause", None), BaseException)  # RayTaskError(cause) as the cause's class
        if isinstance(e, kinds) and not ray_copy:
            return e
        queue += wrapped_errors(e)
    return None
