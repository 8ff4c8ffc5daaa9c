"""Many in-process trials in one process (as a sweep's reused trial process runs them): memory stays bounded."""
from __future__ import annotations

import os

import pytest
from helpers import small_job

from mmray.data.synth import synth
from mmray.train.local import train_local
from mmray.tune.sweep import release_trial_memory

pytestmark = pytest.mark.slow  # about 30 s of training: 14 tiny trials
TRIALS, WARM_UP = 14, 4
BOUND_MB = 32  # measured 11 MB over 15 trials with the release, 37 MB without


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_rss_levels_off_over_many_trials_in_one_process(tmp_path):
    synth(str(tmp_path / "synth"), rows=120, shards=1, seed=0)
    rss = []
    for i in range(TRIALS):
        config = small_job(str(tmp_path / "synth"), workers=1, epochs=1, batch_size=16, name=f"t{i}")
        train_local(config, str(tmp_path / "runs" / f"t{i}"))
        release_trial_memory()
        rss.append(_rss_mb())
    growth = max(rss[WARM_UP:]) - rss[WARM_UP - 1]
    assert growth < BOUND_MB, f"RSS per trial (MB): {[round(r) for r in rss]}"
