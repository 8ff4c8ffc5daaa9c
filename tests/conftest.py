"""Suite-wide settings: nothing is downloaded, Ray reports no usage stats, GPU tests skip without CUDA."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Every Ray a test starts (ray.init in a test, and the processes tests spawn) runs its workers at the suite's own
# priority, as mmray's local Ray does (mmray/runtime.py); Ray's default, nice 15, starves them beside any other
# busy process (the suite is checked beside `stress-ng --cpu 2`).
os.environ.setdefault("RAY_worker_niceness", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

# In-process training in tests uses one intra-op thread: with two, any other busy process on a 2-core
# machine (Ray workers, decoders) makes OpenMP threads wait on each other, measured 25x slower.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    # Tests under tests/integration start Ray: they must say so (`ray` and `slow`), so that
    # `make test-fast` (-m "not slow and not ray") never starts a cluster.
    unmarked = [item.nodeid for item in items if "/integration/" in str(item.path).replace("\\", "/")
                and not {"ray", "slow"} <= set(item.keywords)]
    if unmarked:
        raise pytest.UsageError("integration tests without the `ray` and `slow` markers: " + ", ".join(unmarked))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
