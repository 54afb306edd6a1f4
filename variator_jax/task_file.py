"""Tasks declared as data: a JSON task file wherever a task name is accepted, and the built-ins.

A task file (`--config.task=pkgdoc.json`, the quality pipeline's `--task=pkgdoc.json`):

  {"name": "pkgdoc", "kind": "classification", "labels": ["algebra", "graphs", "templates"],
   "inputs": ["text"]}

  name        the task's name: the T5 input prefix, the run's identity, results file names
              (letters, digits, `_` and `-`);
  kind        "classification" (the label words' first-token logits at the first decoder
              position) or "generation" (greedy answers, references from each row's
              "answers" (a list, or {"text": [...]}) or "targets");
  labels      classification: the label words, in the order of the integer labels (a row's
              "label" is an index or one of these words); their first tokens must differ;
  inputs      the row fields joined into the input, "NAME field: value field: value ...";
  prefix      optional: what starts the input instead of the name ("" for none);
  metrics     optional, classification: "accuracy" (default) and/or "f1" (two labels), the
              first one headlining;
  eval_split  optional: the split evaluated by default ("validation").

Unknown keys and bad values are refused with one line naming the file. The built-in tasks
(`BUILTIN`) are the same declarations, parsed by the same code.
"""
from __future__ import annotations

import json
import os
import re

from variator_jax import stdlib_docs

KINDS = ("classification", "generation")
METRICS = ("accuracy", "f1")
_KEYS = ("name", "kind", "labels", "inputs", "prefix", "metrics", "eval_split")
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def _glue(inputs, labels, metrics=("accuracy",), **kw):
    return dict(kind="classification", inputs=list(inputs), labels=list(labels),
                metrics=list(metrics), **kw)


# Label orders are tfds's glue ClassLabels (tensorflow_datasets/text/glue.py); inputs are
# sorted as t5's `preprocessors.glue` sorts them; metrics are GLUE's, headline first.
BUILTIN = {
    "mnli": _glue(("hypothesis", "premise"), ("entailment", "neutral", "contradiction"),
                  eval_split="validation_matched"),
    "qqp": _glue(("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1")),
    "qnli": _glue(("question", "sentence"), ("entailment", "not_entailment")),
    "sst2": _glue(("sentence",), ("negative", "positive")),
    "rte": _glue(("sentence1", "sentence2"), ("entailment", "not_entailment")),
    "mrpc": _glue(("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("f1", "accuracy")),
    # As t5's `preprocessors.squad` (include_context=True), minus its punctuation padding.
    "squad": dict(kind="generation", inputs=["question", "context"], prefix=""),
    # CPython's own docstrings labelled by their package (`builtin:stdlib_docs`).
    "stdlib_docs": _glue(("text",), stdlib_docs.LABELS),
}


def is_task_file(name) -> bool:
    """A task argument that names a file rather than a built-in task."""
    return isinstance(name, str) and (name.endswith(".json") or os.sep in name)


def read(path: str) -> dict:
    """A task file -> the `data.Task` fields it declares, checked."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"task file {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            declaration = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"task file {path}: not valid JSON ({e})") from None
    return parse(declaration, f"task file {path}")


def parse(d, where: str) -> dict:
    """A declaration (a dict) -> `data.Task` fields; errors are one line starting `where`."""
    def fail(msg):
        raise ValueError(f"{where}: {msg}")

    if not isinstance(d, dict):
        fail(f"expected a JSON object, got {type(d).__name__}")
    unknown = sorted(set(d) - set(_KEYS))
    if unknown:
        fail(f"unknown key {unknown[0]!r}; known keys: {', '.join(_KEYS)}")
    for key in ("name", "kind", "inputs"):
        if key not in d:
            fail(f"missing {key!r}")
    name, kind = d["name"], d["kind"]
    if not isinstance(name, str) or not _NAME.match(name):
        fail(f"'name' must be letters, digits, '_' or '-', got {name!r}")
    if kind not in KINDS:
        fail(f"'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    inputs = _strings(d["inputs"], "inputs", fail)
    labels = d.get("labels")
    if kind == "classification":
        labels = _strings(labels, "labels", fail)
        if len(labels) < 2 or len(set(labels)) < len(labels):
            fail(f"'labels' must be two or more distinct words, got {labels}")
    elif labels is not None:
        fail("'labels' is for classification tasks; a generation task reads 'answers' or "
             "'targets'")
    metrics = _strings(d.get("metrics", ["accuracy"] if kind == "classification" else ["f1"]),
                       "metrics", fail)
    allowed = METRICS if kind == "classification" else ("f1",)
    if any(m not in allowed for m in metrics):
        fail(f"'metrics' of a {kind} task must be from {', '.join(allowed)}, got {metrics}")
    if "f1" in metrics and kind == "classification" and len(labels) != 2:
        fail(f"metric 'f1' needs two labels (the second is the positive class), got {len(labels)}")
    prefix = d.get("prefix", name)
    eval_split = d.get("eval_split", "validation")
    for key, value in (("prefix", prefix), ("eval_split", eval_split)):
        if not isinstance(value, str):
            fail(f"{key!r} must be a string, got {value!r}")
    return dict(name=name, kind=kind, labels=labels, features=tuple(inputs),
                eval_split=eval_split, prefix=prefix, metrics=tuple(metrics), origin=where)


def _strings(value, key, fail) -> list[str]:
    if (not isinstance(value, list) or not value
            or not all(isinstance(v, str) and v.strip() for v in value)):
        fail(f"{key!r} must be a non-empty list of non-empty strings, got {value!r}")
    return list(value)
