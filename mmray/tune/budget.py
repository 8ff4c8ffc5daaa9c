"""A sweep's wall-clock budget (``--time-budget 20m``) and how it was spent. No Ray here.

:class:`mmray.tune.clock.SweepClock` is both a Ray Tune ``Stopper`` and a ``Callback``: as a stopper it ends the sweep when the
budget is spent (Tune then asks its searcher for no more trials and stops the running ones; their reported
checkpoints stay and are ranked like any other); as a callback it notes which trials were still running at
that moment, when each trial reached its best score, and writes ``budget.json`` in the experiment folder
when the sweep ends (:func:`read_ledger` reads it back). Without a budget it only keeps the ledger.

``budget.json``::

    {"budget_s": 300.0 | null, "elapsed_s": 297.1, "exhausted": true,
     "stopped_by_budget": ["a1b2c3d4", ...],          # running (or queued) when the budget ran out
     "best_at_s": {"a1b2c3d4": 84.2, ...}}           # seconds from the start to each trial's best report
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from mmray import storage as store
from mmray.config.errors import UserError

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | float | int, flag: str = "--time-budget") -> float:
    """``"90s"``, ``"5m"``, ``"1.5h"`` (or a bare number of seconds) -> seconds. Raises :class:`UserError`
    naming ``flag`` for anything else, zero or a negative duration."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smh]?)\s*", str(text).lower())
        if m is None:
            raise UserError(f"{flag}: expected a duration such as 90s, 5m or 1.5h (s, m or h), got {text!r}")
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if not math.isfinite(seconds) or seconds <= 0:
        raise UserError(f"{flag}: must be longer than 0 seconds, got {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """``297.1`` -> ``"4m57s"``; ``3720`` -> ``"1h02m"``; under a minute ``"42s"``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def write_ledger(experiment_dir: str, ledger: dict[str, Any]) -> None:
    from mmray.tune.experiment import BUDGET_FILE

    store.write_text(store.join(experiment_dir, BUDGET_FILE), json.dumps(ledger, indent=2) + "\n")


@dataclass
class Ledger:
    """How a sweep spent its time (``budget.json``); empty for a sweep that wrote none."""

    budget_s: float | None = None
    elapsed_s: float | None = None
    exhausted: bool = False
    stopped_by_budget: list[str] = field(default_factory=list)
    best_at_s: dict[str, float] = field(default_factory=dict)


def read_ledger(experiment_dir: str) -> Ledger:
    from mmray.tune.experiment import BUDGET_FILE

    path = store.join(experiment_dir, BUDGET_FILE)
    if not store.is_file(path):
        return Ledger()
    try:
        raw = json.loads(store.read_text(path))
    except ValueError:
        return Ledger()
    return Ledger(raw.get("budget_s"), raw.get("elapsed_s"), bool(raw.get("exhausted")),
                  list(raw.get("stopped_by_budget") or []), dict(raw.get("best_at_s") or {}))


def spending_lines(ledger: Ledger, statuses: dict[str, str], winner_id: str | None) -> list[str]:
    """How the sweep's time was spent, for the summary and the report.

    ``statuses``: trial_id -> leaderboard status (``completed``, ``stopped``, ``budget``, ``error``, ``pending``).
    """
    if ledger.elapsed_s is None:
        return []
    count = {s: sum(v == s for v in statuses.values()) for s in ("completed", "stopped", "budget", "error")}
    started = sum(count.values())
    head = (f"search time budget {format_duration(ledger.budget_s)}, used {format_duration(ledger.elapsed_s)}"
            if ledger.budget_s is not None else f"time used {format_duration(ledger.elapsed_s)}")
    parts = [f"{count['completed']} completed", f"{count['stopped']} stopped early (ASHA or patience)"]
    if ledger.budget_s is not None:
        parts.append(f"{count['budget']} stopped by the budget")
    if count["error"]:
        parts.append(f"{count['error']} failed")
    lines = [f"{head}: {started} trials ran ({', '.join(parts)})"]
    if winner_id is not None and winner_id in ledger.best_at_s:
        lines.append(f"the best trial's best epoch came {format_duration(ledger.best_at_s[winner_id])} "
                     f"into the sweep")
    return lines
