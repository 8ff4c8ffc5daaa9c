"""`mmray data inspect`: the report a user reads."""
from __future__ import annotations

from mmray.data.inspect import inspect_dataset


def test_report_shows_splits_balance_modalities_and_samples(tiny_dir, tiny_info):
    report = inspect_dataset(tiny_dir)
    for split in ("train", "val", "test"):
        line = next(l for l in report.splitlines() if l.startswith(split + " "))
        assert str(tiny_info.split_rows(split)) in line
    assert "circle-low" in report and "triangle-high" in report
    assert "image present" in report and "rejected rows: 0" in report
    assert "PNG 64x64" in report and "WAV 1.00 s, 16000 Hz" in report
    assert report.count("synth-") == 3
