"""No held-out text in training: the check `train.py` and the quality pipeline run before training.

A held-out (validation or test) example overlaps training when its model input (the task's
formatted input, whitespace-normalised) is also the input of a training example, or, against
a pre-training corpus, when that input or one of its text fields is a whole document of the
corpus. Texts are compared by 64-bit hashes, so the training side costs 8 bytes a text.
Containment inside a longer document is not looked for.

Example:
  >>> found = overlapping(task, test_examples, input_hashes(task, train_examples))
  >>> refuse(found, "data.eval test", "data.train train")   # ValueError if any
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable


def _hash(text: str) -> int:
    normalised = " ".join(text.split())
    return int.from_bytes(hashlib.blake2b(normalised.encode("utf-8"), digest_size=8).digest(),
                          "big")


def input_hashes(task, examples: Iterable[dict]) -> set[int]:
    """Hashes of the examples' formatted inputs (what the model reads)."""
    return {_hash(task.format(e)[0]) for e in examples}


def document_hashes(documents: Iterable[dict]) -> set[int]:
    """Hashes of a corpus's documents (their "text")."""
    return {_hash(d["text"]) for d in documents if isinstance(d.get("text"), str)}


def overlapping(task, held_out: Iterable[dict], training: set[int],
                fields: bool = False) -> list[str]:
    """The held-out examples' inputs found in `training` (hashes), in order; with `fields`,
    also those whose text fields are (whole documents of a corpus)."""
    found = []
    for example in held_out:
        inputs = task.format(example)[0]
        texts = [inputs] + ([example[f] for f in task.features
                             if isinstance(example.get(f), str)] if fields else [])
        if any(_hash(t) in training for t in texts):
            found.append(inputs)
    return found


def refuse(found: list[str], held_out: str, training: str) -> None:
    """One line, if any held-out text is in training."""
    if found:
        raise ValueError(f"{len(found)} example(s) of {held_out} are also in {training} (e.g. "
                         f"{found[0][:80]!r}): a model evaluated on what it trained on; use "
                         f"disjoint splits (a jsonl file without a 'split' field is split by a "
                         f"hash of the text)")
