"""Task metrics on hand-made examples with exact expected values."""
import math

import numpy as np
import pytest

from variator_jax import metrics


def test_accuracy_with_weights_zeroing_padding():
    preds, labels = [1, 0, 2, 2, 0], [1, 1, 2, 0, 0]
    assert metrics.accuracy(preds, labels) == 3 / 5
    # The last two are batch padding: 2 of the 3 real examples are right.
    assert metrics.accuracy(preds, labels, weights=[1, 1, 1, 0, 0]) == 2 / 3
    assert math.isnan(metrics.accuracy(preds, labels, weights=np.zeros(5)))
    with pytest.raises(ValueError):
        metrics.accuracy([1, 0], [1, 0, 1])


def test_f1_by_hand():
    preds = np.array([1, 1, 0, 0, 1, 0])
    labels = np.array([1, 0, 1, 0, 1, 1])
    # TP = 2, FP = 1, FN = 2: precision 2/3, recall 1/2, F1 = 2*(1/3)/(7/6) = 4/7.
    assert metrics.f1(preds, labels) == pytest.approx(4 / 7, abs=1e-15)
    # Class 0 as positive: TP = 1 (idx 3), FP = 2 (idx 2, 5), FN = 1 (idx 1): 2/5.
    assert metrics.f1(preds, labels, positive=0) == pytest.approx(2 / 5, abs=1e-15)
    # Padding zeroed: drop idx 2 and 5 (the two false negatives) -> TP 2, FP 1: 4/5.
    assert metrics.f1(preds, labels, weights=[1, 1, 0, 1, 1, 0]) == pytest.approx(0.8)


def test_f1_without_positives_is_zero():
    assert metrics.f1([0, 0, 0], [0, 0, 0]) == 0.0  # sklearn's zero_division default.
    assert metrics.f1([1, 1], [0, 0]) == 0.0
    # Positives only in padding do not count.
    assert metrics.f1([1, 0], [1, 0], weights=[0, 1]) == 0.0


def test_squad_normalization():
    assert metrics.normalize_answer("The  Cat.") == "cat"
    assert metrics.normalize_answer("An apple, a DAY!") == "apple day"
    # Articles only as whole words; punctuation goes before they are removed.
    assert metrics.normalize_answer("theatre (a-z)") == "theatre az"
    assert metrics.squad_em_f1(["The  Cat."], [["cat"]]) == {"exact_match": 100.0, "f1": 100.0}


def test_squad_partial_overlap_and_max_over_golds():
    # "big red barn" vs "the red barn door": tokens [big, red, barn] vs [red, barn, door];
    # 2 shared, precision 2/3, recall 2/3, F1 = 2/3. EM 0.
    out = metrics.squad_em_f1(["big red barn"], [["the red barn door"]])
    assert out["exact_match"] == 0.0 and out["f1"] == pytest.approx(200 / 3)
    # Max over golds, mean over examples: example 1 matches its 2nd gold exactly (EM 1,
    # F1 1); example 2: "in 1990" vs "1990" -> precision 1/2, recall 1, F1 2/3; EM 0.
    out = metrics.squad_em_f1(["Paris", "in 1990"], [["London", "paris"], ["1990"]])
    assert out["exact_match"] == 50.0
    assert out["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    # Repeated tokens count once per occurrence in both (Counter intersection):
    # [a] dropped; [cat, cat] vs [cat]: common 1, precision 1/2, recall 1 -> 2/3.
    assert metrics.squad_em_f1(["cat cat"], [["a cat"]])["f1"] == pytest.approx(200 / 3)


def test_squad_empty_after_normalization():
    # Both normalize to "": the official script gives EM 1 but F1 0 (no shared tokens).
    assert metrics.squad_em_f1(["the"], [["."]]) == {"exact_match": 100.0, "f1": 0.0}
    with pytest.raises(ValueError):
        metrics.squad_em_f1(["x"], [[]])
    with pytest.raises(ValueError):
        metrics.squad_em_f1(["x", "y"], [["x"]])


def test_glue_metric_names_per_task():
    preds, labels = [1, 0, 1, 1], [1, 0, 0, 1]  # TP 2, FP 1, FN 0; 3 of 4 right.
    for task in ("mnli", "glue/mnli_mismatched", "qnli", "SST-2", "rte"):
        assert metrics.glue_metric(task, preds, labels) == {"accuracy": 0.75}
    mrpc = metrics.glue_metric("mrpc", preds, labels)
    assert mrpc == {"f1": 0.8, "accuracy": 0.75} and next(iter(mrpc)) == "f1"
    assert metrics.glue_metric("qqp", preds, labels) == {"accuracy": 0.75, "f1": 0.8}
    assert metrics.headline_metric("mrpc") == "f1"
    assert metrics.headline_metric("qqp") == "accuracy"
    # Weights drop the false positive.
    assert metrics.glue_metric("mrpc", preds, labels, weights=[1, 1, 0, 1]) == {
        "f1": 1.0, "accuracy": 1.0}
    # Text labels, as a text-to-text model emits them.
    assert metrics.glue_metric("mrpc", ["equivalent", "not_equivalent"],
                               ["equivalent", "equivalent"], positive="equivalent") == {
        "f1": pytest.approx(2 / 3), "accuracy": 0.5}
    with pytest.raises(ValueError, match="unknown GLUE task"):
        metrics.glue_metric("cola", preds, labels)
