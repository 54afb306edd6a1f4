"""`builtin:stdlib_docs`: a text-classification task that ships with every CPython.

Each example is one docstring of the standard library's own sources, read with `ast`
(nothing is imported or run), labelled by the top-level module or package it belongs to:
a fact about the text, not an annotation anybody invented. Eight packages with distinct
first letters (the verbalizer reads the first byte of each label) and enough docstrings:

    asyncio email importlib logging multiprocessing tkinter unittest xml

Construction, deterministic for one CPython version:
  - every module, class and function docstring of `Lib/<package>/**.py` (tests and
    `__pycache__` skipped), whitespace-normalised, kept if it has at least 40 characters;
  - a text that occurs more than once (in any package) is kept once, and dropped if its
    occurrences disagree on the label, so no text appears under two labels or in two splits;
  - at most `MAX_PER_LABEL` docstrings per label, chosen by a hash of the text (the largest
    package, tkinter, would otherwise be 26 % of the data);
  - the split is a function of the text's hash: 1/5 test, 1/10 validation, the rest train.

A fourth split, `unlabeled`, holds every other docstring of the standard library (all of
`Lib`, same rules, `site-packages` skipped) whose hash puts it in train, with label -1: text
of the same kind for losses that need no label (the plugin's hidden-state distillation),
as tfds's `imdb_reviews` has its `unsupervised` split. No text of it is in another split.
Splits combine as in tfds: `train+unlabeled`.

Sizes on CPython 3.11 (`python -m variator_jax.stdlib_docs` prints them): see
`describe()`; the task's majority class is the chance level reported by the quality
benchmark.
"""
from __future__ import annotations

import ast
import collections
import functools
import hashlib
import os
import sys
import sysconfig

from variator_jax import splits

LABELS = ("asyncio", "email", "importlib", "logging", "multiprocessing", "tkinter",
          "unittest", "xml")
SPLITS = ("train", "validation", "test")
UNLABELED = "unlabeled"  # Label -1: see the module docstring.
MIN_CHARS = 40
MAX_PER_LABEL = 250
_SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages"}


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def split_of(text: str) -> str:
    """The split a docstring belongs to, from its text alone: 20 % test, 10 % validation
    (the rule of every `jsonl:` file without splits of its own, `splits.hash_split`)."""
    return splits.hash_split(text)


def _docstrings(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield " ".join(doc.split())


def stdlib_root() -> str:
    """Where this interpreter's pure-Python standard library lives."""
    return sysconfig.get_paths()["stdlib"]


def _package_docstrings(top: str):
    """Every docstring of at least MIN_CHARS characters under `top` (a directory or a .py)."""
    if top.endswith(".py"):
        yield from (doc for doc in _docstrings(top) if len(doc) >= MIN_CHARS)
        return
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield from (doc for doc in _docstrings(os.path.join(dirpath, name))
                            if len(doc) >= MIN_CHARS)


@functools.lru_cache(maxsize=2)
def build(root: str | None = None) -> dict[str, list[dict]]:
    """-> {split: [{"text": docstring, "label": label index}, ...]} in a fixed order."""
    root = root or stdlib_root()
    labels_of = collections.defaultdict(set)
    for label in LABELS:
        top = os.path.join(root, label)
        if not os.path.isdir(top):
            raise FileNotFoundError(f"builtin:stdlib_docs: package {label} not found under {root}")
        for doc in _package_docstrings(top):
            labels_of[doc].add(label)
    by_label = collections.defaultdict(list)
    for text, labels in labels_of.items():
        if len(labels) == 1:  # A text shared by two packages has no single true label.
            by_label[labels.pop()].append(text)
    splits = {s: [] for s in SPLITS}
    for index, label in enumerate(LABELS):
        kept = sorted(by_label[label], key=lambda t: _digest("keep:" + t))[:MAX_PER_LABEL]
        for text in kept:
            splits[split_of(text)].append({"text": text, "label": index})
    for split in SPLITS:  # Interleave labels deterministically rather than in label blocks.
        splits[split].sort(key=lambda e: _digest("order:" + e["text"]))
    return splits


@functools.lru_cache(maxsize=2)
def build_unlabeled(root: str | None = None) -> list[dict]:
    """-> the `unlabeled` split (see the module docstring): [{"text", "label": -1}, ...].
    It parses all of `Lib`, so only what asks for it pays for it."""
    root = root or stdlib_root()
    labelled = {e["text"] for examples in build(root).values() for e in examples}
    others = set()
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name not in _SKIP_DIRS and (name.endswith(".py") or os.path.isdir(path)):
            others.update(_package_docstrings(path))
    return sorted(({"text": text, "label": -1} for text in others
                   if split_of(text) == "train" and text not in labelled),
                  key=lambda e: _digest("order:" + e["text"]))


def read(split: str | None = None) -> list[dict]:
    """The examples of one split ("train", "validation", "test" or "unlabeled"; default
    "train"), or of several joined by "+" as in tfds ("train+unlabeled")."""
    names = (split or "train").split("+")
    for name in names:
        if name not in SPLITS + (UNLABELED,):
            raise ValueError(f"builtin:stdlib_docs has splits {', '.join(SPLITS + (UNLABELED,))}"
                             f" (joined by '+'), not {split!r}")
    return [e for name in names
            for e in (build_unlabeled() if name == UNLABELED else build()[name])]


def describe() -> dict:
    """Sizes and label counts per split, and the majority-class share of the test split."""
    out = {"python": sys.version.split()[0], "labels": list(LABELS)}
    for split, examples in build().items():
        counts = collections.Counter(LABELS[e["label"]] for e in examples)
        out[split] = {"examples": len(examples),
                      "per_label": {label: counts[label] for label in LABELS}}
    out[UNLABELED] = {"examples": len(build_unlabeled())}
    test_counts = out["test"]["per_label"].values()
    out["chance"] = max(test_counts) / sum(test_counts)
    return out


if __name__ == "__main__":
    import json

    from variator_jax import cli
    cli.run_main(lambda _: print(json.dumps(describe(), indent=2)))  # Errors: one line.
