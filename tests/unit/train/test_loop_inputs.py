"""What a loop run reads besides its config is declared (LoopInputs), planned once and passed down."""
from __future__ import annotations

import inspect
import pickle

from mmray.data.cache import CachePlan
from mmray.train import loop
from mmray.train.context import LocalContext, LoopInputs


def test_a_plan_that_is_not_used_gives_no_cached_inputs():
    inputs = LoopInputs.from_cache(CachePlan(False, "an encoder trains"))
    assert inputs == LoopInputs() and not inputs.from_cache_in(1)


def test_a_full_cache_serves_every_epoch_and_a_partial_one_its_first_epochs(monkeypatch):
    monkeypatch.setattr(CachePlan, "weights", property(lambda self: {"image": "abc"}))
    full = LoopInputs.from_cache(CachePlan(True, "reused", epochs=5))
    assert full.cached_encoders == {"image": "abc"} and full.cached_epochs is None
    assert all(full.from_cache_in(e) for e in (1, 5, 9))
    partial = LoopInputs.from_cache(CachePlan(True, "reused", epochs=2, partial=True))
    assert [partial.from_cache_in(e) for e in (1, 2, 3)] == [True, True, False]


def test_inputs_travel_to_ray_workers_unchanged():
    inputs = LoopInputs({"audio": "f00"}, cached_epochs=3)
    assert pickle.loads(pickle.dumps(inputs)) == inputs


def test_the_loop_reads_no_undeclared_context_attribute():
    assert not hasattr(LocalContext, "cached_encoders")
    source = inspect.getsource(loop)
    assert 'getattr(ctx, "cached_encoders"' not in source and '.endswith(".pooled")' not in source
    assert "inputs" in inspect.signature(loop.train_loop).parameters
