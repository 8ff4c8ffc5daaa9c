"""Progress lines for long data jobs (cache builds, ``data synth``): one line every few seconds, none for a short job."""
from __future__ import annotations

import sys
import time


class BuildProgress:
    """Lines a person can follow while a long build runs: one every ``every_s`` seconds (none for a short build)::

        mmray embedding cache: 3,456/12,000 rows encoded (29%; audio, image, text), 118 rows/s, ETA 1m12s
    """

    def __init__(self, total: int, modalities, *, every_s: float = 10.0, out=None, clock=time.monotonic,
                 what: str = "embedding cache", verb: str = "encoded"):
        self.total, self.modalities, self.every_s = max(1, total), ", ".join(sorted(modalities)), every_s
        self.what, self.verb = what, verb
        self.out, self.clock = out, clock
        self.done = 0
        self.start = self.last = clock()

    def add(self, rows: int) -> None:
        self.done += rows
        now = self.clock()
        if now - self.last < self.every_s:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = int(round(max(self.total - self.done, 0) / max(rate, 1e-9)))
        print(f"mmray {self.what}: {self.done:,}/{self.total:,} rows {self.verb} ({self.done / self.total:.0%}; "
              f"{self.modalities}), {rate:,.0f} rows/s, ETA {eta // 60}m{eta % 60:02d}s", file=self.out or sys.stdout,
              flush=True)
