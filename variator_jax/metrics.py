"""The paper's task metrics (docs/DESIGN.md §2): GLUE accuracy / F1, SQuAD v1.1 EM / F1.

Host-side NumPy, exact definitions:
  - `accuracy`, `f1`: fractions in [0, 1], as scikit-learn and the GLUE/HF `evaluate` scripts
    return them. `weights` (1 for real examples, 0 for batch padding) make padded examples
    count for nothing.
  - `squad_em_f1`: the official SQuAD v1.1 `evaluate-v1.1.py`, percentages in [0, 100].

Example:
  >>> glue_metric("mrpc", [1, 0, 1, 1], [1, 0, 0, 1])
  {'f1': 0.8, 'accuracy': 0.75}
  >>> squad_em_f1(["The  Cat."], [["cat", "a dog"]])
  {'exact_match': 100.0, 'f1': 100.0}
"""
from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence
from typing import Any

import numpy as np


def _weighted(preds: Any, labels: Any, weights: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat preds, labels and float weights (all ones when None), shapes checked."""
    preds, labels = np.asarray(preds).reshape(-1), np.asarray(labels).reshape(-1)
    w = np.ones(preds.shape, np.float64) if weights is None else (
        np.asarray(weights, np.float64).reshape(-1))
    if not preds.shape == labels.shape == w.shape:
        raise ValueError(f"preds, labels, weights differ in size: "
                         f"{preds.shape}, {labels.shape}, {w.shape}")
    return preds, labels, w


def accuracy(preds: Any, labels: Any, weights: Any = None) -> float:
    """Weighted fraction of `preds == labels`; NaN when the weights sum to 0 (nothing to score)."""
    preds, labels, w = _weighted(preds, labels, weights)
    total = w.sum()
    return float(np.sum(w * (preds == labels)) / total) if total > 0 else float("nan")


def f1(preds: Any, labels: Any, positive: Any = 1, weights: Any = None) -> float:
    """Binary F1 of class `positive` = 2TP / (2TP + FP + FN), as sklearn `f1_score`.

    With no positive among predictions and labels (2TP + FP + FN = 0) it is 0.0, sklearn's
    `zero_division` default. MRPC's and QQP's positive class is 1 (paraphrase / duplicate).
    """
    preds, labels, w = _weighted(preds, labels, weights)
    p, t = preds == positive, labels == positive
    tp, fp, fn = (float(np.sum(w * m)) for m in (p & t, p & ~t, ~p & t))
    return 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn > 0 else 0.0


# -- SQuAD v1.1, as the official evaluate-v1.1.py --------------------------------------------
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation, drop articles (a, an, the), collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _token_f1(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    same = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if same == 0:  # Also covers empty answers, as the official script does.
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_em_f1(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """SQuAD v1.1 exact match and token F1, each the max over an example's gold answers.

    Args:
      predictions: one answer string per example.
      answers: the gold answers of each example (at least one).
    Returns:
      {"exact_match": ..., "f1": ...} in per cent (0-100), the official script's keys and scale.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answer lists")
    if not predictions:
        raise ValueError("no predictions to score")
    em = f1_sum = 0.0
    for i, (pred, golds) in enumerate(zip(predictions, answers, strict=True)):
        if isinstance(golds, str) or not golds:
            raise ValueError(f"example {i}: answers must be a non-empty list of strings")
        em += max(float(normalize_answer(pred) == normalize_answer(g)) for g in golds)
        f1_sum += max(_token_f1(pred, g) for g in golds)
    return {"exact_match": 100.0 * em / len(predictions), "f1": 100.0 * f1_sum / len(predictions)}


# -- GLUE ------------------------------------------------------------------------------------
# Tasks of the paper (docs/DESIGN.md §2) and the metrics GLUE reports for them, headline first.
# `stdlib_docs` (CPython's docstrings by package, stdlib_docs.py) is scored like them: accuracy.
_GLUE = {"mnli": ("accuracy",), "qnli": ("accuracy",), "sst2": ("accuracy",),
         "rte": ("accuracy",), "qqp": ("accuracy", "f1"), "mrpc": ("f1", "accuracy"),
         "stdlibdocs": ("accuracy",)}


def _glue_task(task: str) -> str:
    name = task.lower().split("/")[-1].replace("-", "").replace("_", "")
    if name in ("mnlimatched", "mnlimismatched", "mnlim", "mnlimm"):  # Both MNLI eval splits.
        name = "mnli"
    if name not in _GLUE:
        raise ValueError(f"unknown GLUE task {task!r}; known: {', '.join(_GLUE)}")
    return name


def headline_metric(task: str) -> str:
    """The one number the paper reports: 'f1' for MRPC, 'accuracy' otherwise."""
    return _GLUE[_glue_task(task)][0]


def glue_metric(task: str, preds: Any, labels: Any, weights: Any = None,
                positive: Any = 1) -> dict[str, float]:
    """The GLUE metrics of `task`, headline first: accuracy; MRPC f1 + accuracy; QQP + f1.

    `task` may be spelled "sst2", "SST-2", "glue/mnli_matched", ... `positive` is the label
    value of the F1 class (1 for integer labels).
    """
    return classification_metrics(_GLUE[_glue_task(task)], preds, labels, weights, positive)


def classification_metrics(names: Sequence[str], preds: Any, labels: Any, weights: Any = None,
                           positive: Any = 1) -> dict[str, float]:
    """The metrics `names` ("accuracy", "f1"), in that order: a task's declared metrics."""
    funcs = {"accuracy": lambda: accuracy(preds, labels, weights),
             "f1": lambda: f1(preds, labels, positive, weights)}
    return {name: funcs[name]() for name in names}
