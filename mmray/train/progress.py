"""Progress a person can follow: a live bar within an epoch and one line per epoch.

On a terminal the bar redraws in place; elsewhere (CI logs, files) only parseable
``key=value`` lines are printed, one per epoch.
"""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO

SHOWN = ("train.loss", "train.contrastive_loss", "train.adversarial_loss", "val.loss", "val.accuracy", "val.f1",
         "train.samples_per_s", "gpu.utilization", "gpu.memory_peak_gb")  # gpu.*: CUDA runs only
PRETRAINING = "contrastive pretraining"  # the loop's ``phase`` of a pre-training epoch


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class ProgressPrinter:
    """Renders loop events (``epoch_start``, ``step``, ``epoch_end``, ``early_stop``, ``resumed``, ``sharding``) and the
    driver's (``embedding_cache``, ``decode_cache``, ``worker_failed``, and ``measure_start`` / ``measure`` while the
    exported epoch is measured on val and test)."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None, width: int = 24):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.width = width
        self._epoch_started = time.perf_counter()
        self._epoch_seconds: list[float] = []
        self._bar_shown = False
        self._measure_started = self._measure_line = 0.0

    def __call__(self, event: dict[str, Any]) -> None:
        getattr(self, f"_on_{event['type']}", lambda e: None)(event)

    def _on_resumed(self, e: dict[str, Any]) -> None:
        self._line(f"resuming after epoch {e['epoch']} from {e['path']}")

    def _on_epoch_start(self, e: dict[str, Any]) -> None:
        self._epoch_started = time.perf_counter()

    def _on_step(self, e: dict[str, Any]) -> None:
        if self.tty:
            self._bar(f"epoch {e['epoch']}", e["rows"], e["rows_total"], self._epoch_started, f"loss {e['loss']:.4f}  ")

    def _on_measure_start(self, e: dict[str, Any]) -> None:  # after training: the exported epoch on val and test
        self._measure_started = self._measure_line = time.perf_counter()
        rows = " + ".join(f"{n:,} {split}" for split, n in e["rows"].items())
        which = f"epoch {e['epoch']}" if e.get("epoch") is not None else "the exported epoch"
        passes = (f", {e['passes']} passes a row: the model, then without and with only each modality"
                  if e["passes"] > 1 else "")
        self._line(f"measuring {which} on {rows} rows{passes}")

    def _on_measure(self, e: dict[str, Any]) -> None:
        if self.tty:
            self._bar(f"measuring {e['split']}", e["rows"], e["rows_total"], self._measure_started, "")
        elif not e.get("done") and time.perf_counter() - self._measure_line >= 10:
            self._measure_line = time.perf_counter()
            self._line(f"mmray measuring split={e['split']} rows={e['rows']}/{e['rows_total']}")

    def _bar(self, what: str, rows: int, rows_total: int, started: float, extra: str) -> None:
        total = max(1, rows_total)
        filled = int(min(1.0, rows / total) * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        rate = rows / max(1e-9, time.perf_counter() - started)
        self.stream.write(f"\r  {what} [{bar}] {rows:,}/{total:,} rows  {extra}{rate:,.0f} rows/s ")
        self.stream.flush()
        self._bar_shown = True

    def _on_epoch_end(self, e: dict[str, Any]) -> None:
        m, epoch, epochs = e["metrics"], e["epoch"], e["epochs"]
        self._epoch_seconds.append(time.perf_counter() - self._epoch_started)
        recent = self._epoch_seconds[-3:]
        eta = sum(recent) / len(recent) * (epochs - epoch)
        best = m.get("best_epoch") == epoch
        pretraining = e.get("phase") == PRETRAINING
        if self.tty:
            parts = [f"epoch {epoch}/{epochs}" + (f" ({PRETRAINING})" if pretraining else "")]
            parts += [f"{k} {m[k]:.4g}" for k in SHOWN if k in m]
            parts.append(f"ETA {_duration(eta)}")
            self._line("  ".join(parts) + ("  * best" if best else ""))
        else:
            parts = [f"epoch={epoch}/{epochs}"] + (["phase=pretrain"] if pretraining else [])
            parts += [f"{k}={m[k]:.6g}" for k in SHOWN if k in m]
            parts += [f"bad_records={int(m.get('train.bad_records', 0) + m.get('val.bad_records', 0))}",
                      f"eta_s={eta:.0f}", f"best={int(best)}"]
            self._line("mmray " + " ".join(parts))

    def _on_worker_failed(self, e: dict[str, Any]) -> None:
        where = f" (Ray's full report: {e['log_dir']})" if e.get("log_dir") else ""
        self._line(f"{e['line']}{where}")

    def _on_embedding_cache(self, e: dict[str, Any]) -> None:
        self._line(e["line"])

    def _on_decode_cache(self, e: dict[str, Any]) -> None:
        self._line(e["line"])

    def _on_sharding(self, e: dict[str, Any]) -> None:  # scaling.strategy: fsdp
        self._line(e["line"])

    def _on_early_stop(self, e: dict[str, Any]) -> None:
        self._line(f"early stopping after epoch {e['epoch']}: no improvement since epoch {e['best_epoch']}")

    def _line(self, text: str) -> None:
        if self._bar_shown:
            self.stream.write("\r\033[K")
            self._bar_shown = False
        self.stream.write(text + "\n")
        self.stream.flush()
