"""A sweep says once whether its trials read the shared caches; a trial speaks only when it cannot read one."""
from __future__ import annotations

from mmray.data.cache import CachePlan
from mmray.data.decoded import DecodePlan
from mmray.tune.sweep import trial_input_notes

NONE_BUILT = DecodePlan(False, "none built with this key")
USED = DecodePlan(True, "reused")
NO_EMBEDDING = CachePlan(False, "model.encoders.audio.freeze is false")


def test_a_trial_reading_what_the_sweep_shares_says_nothing():
    shared = {"embedding cache": False, "decoded-input cache": True}
    assert trial_input_notes(shared, NO_EMBEDDING, USED) == []


def test_a_trial_not_reading_what_the_sweep_did_not_share_says_nothing():
    # e.g. a swept image size: the sweep's own line said why no trial reads the cache
    assert trial_input_notes({"embedding cache": False, "decoded-input cache": False}, NO_EMBEDDING, NONE_BUILT) == []
    assert trial_input_notes(None, NO_EMBEDDING, NONE_BUILT) == []  # a caller that shares nothing


def test_a_trial_that_cannot_read_a_shared_cache_says_so_once():
    notes = trial_input_notes({"embedding cache": False, "decoded-input cache": True}, NO_EMBEDDING, NONE_BUILT)
    assert notes == ["decoded-input cache: not used: none built with this key"]
