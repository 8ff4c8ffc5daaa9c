"""ClassificationMetrics against hand-computed values."""
import warnings

import pytest
import torch

from mmray.train.metrics import ClassificationMetrics, metrics_from_confusion


def test_three_class_example_matches_hand_computation():
    # true:  0 0 0 1 1 2 2 2
    # pred:  0 0 1 1 2 2 2 0
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    preds = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0])
    m = ClassificationMetrics(3)
    m.update(preds, labels)
    out = m.compute()

    assert out["confusion"] == [[2, 1, 0], [0, 1, 1], [1, 0, 2]]
    assert out["accuracy"] == pytest.approx(5 / 8)
    # precision per class: 2/3, 1/2, 2/3 ; recall: 2/3, 1/2, 2/3
    p = [2 / 3, 1 / 2, 2 / 3]
    assert out["precision"] == pytest.approx(sum(p) / 3)
    assert out["recall"] == pytest.approx(sum(p) / 3)
    assert out["f1"] == pytest.approx(sum(p) / 3)  # p == r per class, so f1 == p
    assert out["rows"] == 8
    assert m.confusion.dtype == torch.int64


def test_logits_are_argmaxed_and_batches_accumulate():
    m = ClassificationMetrics(2)
    m.update(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]))
    m.update(torch.tensor([1]), torch.tensor([1]))
    assert m.compute()["confusion"] == [[1, 1], [0, 1]]
    assert m.compute()["accuracy"] == pytest.approx(2 / 3)


def test_class_never_predicted_scores_zero_without_warning():
    labels = torch.tensor([0, 1, 2, 2])
    preds = torch.tensor([0, 1, 1, 1])  # class 2 never predicted
    m = ClassificationMetrics(3)
    m.update(preds, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = m.compute()
    # precision: 1, 1/3, 0 ; recall: 1, 1, 0 ; f1: 1, 0.5, 0
    assert out["precision"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert out["recall"] == pytest.approx((1 + 1 + 0) / 3)
    assert out["f1"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert out["accuracy"] == pytest.approx(0.5)


def test_class_without_support_scores_zero():
    out = metrics_from_confusion([[3, 0], [0, 0]])  # class 1 never occurs nor predicted
    assert out["accuracy"] == 1.0
    assert out["precision"] == pytest.approx(0.5)
    assert out["recall"] == pytest.approx(0.5)
    assert out["f1"] == pytest.approx(0.5)


def test_single_class():
    m = ClassificationMetrics(1)
    m.update(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long))
    out = m.compute()
    assert out == {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "confusion": [[4]], "rows": 4}


def test_empty_gives_zeros():
    m = ClassificationMetrics(3)
    m.update(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    out = m.compute()
    assert out["accuracy"] == out["precision"] == out["recall"] == out["f1"] == 0.0
    assert out["rows"] == 0
    assert out["confusion"] == [[0] * 3] * 3


def test_merge_equals_single_accumulator():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (100,), generator=g)
    logits = torch.randn(100, 4, generator=g)
    whole = ClassificationMetrics(4)
    whole.update(logits, labels)
    a, b = ClassificationMetrics(4), ClassificationMetrics(4)
    a.update(logits[:37], labels[:37])
    b.update(logits[37:], labels[37:])
    a.merge_(b.confusion)
    assert torch.equal(a.confusion, whole.confusion)
    assert a.compute() == whole.compute()


def test_bad_inputs_raise_clear_errors():
    m = ClassificationMetrics(3)
    with pytest.raises(ValueError, match="outside"):
        m.update(torch.tensor([0, 3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        m.update(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="classes"):
        m.update(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="merge"):
        m.merge_(torch.zeros(2, 2, dtype=torch.int64))
