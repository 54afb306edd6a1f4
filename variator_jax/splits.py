"""Named splits of `text:` and `jsonl:` sources, as HF datasets' `data_files` and tfds give them.

A split spec is `NAME`, `NAME[start:end]` (ints or percents, as tfds slices) or several joined
by "+" (`train+unlabeled`); `all` is every record whatever its split. Where a source's splits
come from:

  - `jsonl:DIR` holding `train.jsonl`, `validation.jsonl`, `test.jsonl` and/or
    `unlabeled.jsonl` (each may be gzip, `.jsonl.gz`): one file per split;
  - any other `jsonl:` source (a file, a glob, a directory without such files) whose first
    record has a `"split"` field: every record must have one, one of `SPLITS`;
  - a `jsonl:` source without that field: split by a hash of each record's text
    (`hash_split`: 70 % train, 10 % validation, 20 % test, the rule of
    `builtin:stdlib_docs`), so one text always lands in one split; it says so once;
  - `text:`: one split, `train` (every document); slice it (`train[97%:]`) for held-out text;
  - `hf:PATH` (optional, with HF `datasets` installed): a dataset saved by `save_to_disk`
    or a directory of data files `datasets.load_dataset` reads (`train.csv`, ...): a
    `DatasetDict`'s splits by name; a single `Dataset` by its "split" column or the hash.

Asking for a split the source does not have is an error, never the whole file. Finding the
`split` field's or the hash's splits reads every record once per process (a pre-training
corpus read whole, `all`, is not read ahead).

Example:
  >>> rows = open_split("jsonl", "/data/pkgdoc", "train[:80%]")   # DIR/train.jsonl's first 80 %
  >>> len(rows), rows[0], where(rows, 0)                           # ..., {...}, ".../train.jsonl:1"
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys

import numpy as np

SPLITS = ("train", "validation", "test", "unlabeled")
ALL = "all"
HASH_FRACTIONS = {"train": 0.7, "validation": 0.1, "test": 0.2}  # hash_split's, in tenths.
_PART = re.compile(r"^(?P<name>[\w.-]+)(?:\[(?P<start>-?\d+%?)?:(?P<end>-?\d+%?)?\])?$")
_said: set = set()  # Sources whose hash split was announced in this process.
_assignments: dict = {}  # (paths, stamps) -> per-record split names (a pass over the files).


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def hash_split(text: str) -> str:
    """The split a text belongs to, from the text alone: 20 % test, 10 % validation, 70 % train."""
    bucket = _digest("split:" + text) % 10
    return "test" if bucket < 2 else "validation" if bucket == 2 else "train"


def record_text(record: dict) -> str:
    """What a record's split hash and the overlap check read: its "text", or else its other
    fields (label, split and targets left out) as sorted JSON."""
    if isinstance(record.get("text"), str):
        return record["text"]
    rest = {k: v for k, v in record.items() if k not in ("label", "split", "targets", "answers")}
    return json.dumps(rest, sort_keys=True, ensure_ascii=False)


def parse(split: str) -> list[tuple[str, str | None, str | None]]:
    """'train[:80%]+unlabeled' -> [('train', None, '80%'), ('unlabeled', None, None)]."""
    parts = []
    for part in split.split("+"):
        m = _PART.match(part.strip())
        if not m:
            raise ValueError(f"bad split {split!r}; expected NAME or NAME[start:end] (ints or "
                             f"percents), several joined by '+'")
        parts.append((m["name"], m["start"], m["end"]))
    return parts


def take(items, start: str | None, end: str | None):
    """A tfds-style slice of `items` (a list, a range or an array): bounds are ints or percents."""
    def bound(b):
        if b is None:
            return None
        return round(len(items) * int(b[:-1]) / 100) if b.endswith("%") else int(b)
    return items[bound(start):bound(end)]


def select(split: str, available: tuple[str, ...], read, where: str) -> list:
    """The records of `split` from a source with named splits held in memory: `read(name)`
    gives one split's records (a list); a name not in `available` is an error naming them."""
    return [r for _, records in _select_parts(split, available, read, where) for r in records]


# ================================ file sources ================================


class SplitSource:
    """Records of indexed corpora, by (corpus, record indices) parts; a grain data source.

    `locate(i)` gives record `i`'s place (`where` formats it), for errors about its fields."""

    def __init__(self, parts):
        # A range stays a range: a whole corpus costs no memory per record.
        self._parts = [(c, ix if isinstance(ix, range) else np.asarray(ix, np.int64))
                       for c, ix in parts]
        self._offsets = np.cumsum([0] + [len(ix) for _, ix in self._parts])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _find(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} of {len(self)}")
        p = int(np.searchsorted(self._offsets, i, side="right")) - 1
        corpus, indices = self._parts[p]
        return corpus, int(indices[i - self._offsets[p]])

    def __getitem__(self, i: int):
        corpus, j = self._find(int(i))
        return corpus[j]

    def locate(self, i: int) -> tuple[str, int, int | None] | None:
        """(file, byte offset, line number or None) of record `i`, as `IndexedCorpus.locate`;
        None for records that come from no file (HF datasets)."""
        corpus, j = self._find(int(i))
        return corpus.locate(j) if hasattr(corpus, "locate") else None


def where(source, i: int) -> str:
    """'FILE:LINE' of record `i` of a source that can locate its records, else 'record I'."""
    place = source.locate(i) if hasattr(source, "locate") else None
    if place is None:
        return f"record {i}"
    path, offset, line = place
    return f"{path}:{line}" if line is not None else f"{path} (byte {offset})"


def split_files(directory: str) -> dict[str, str]:
    """{split: file} of a `jsonl:DIR` laid out as HF `data_files` (empty if it is not)."""
    if not os.path.isdir(directory):
        return {}
    found = {}
    for name in SPLITS:
        for ext in (".jsonl", ".jsonl.gz"):
            path = os.path.join(directory, name + ext)
            if os.path.isfile(path):
                if name in found:
                    raise ValueError(f"jsonl:{directory} has both {found[name]} and {path} "
                                     f"for split {name!r}; keep one")
                found[name] = path
    return found


def open_split(scheme: str, target: str, split: str | None, index_dir: str | None = None):
    """The records of `split` (default `train`) of `text:`/`jsonl:` TARGET. -> SplitSource."""
    from variator_jax import corpus as corpus_lib
    split = split or "train"
    where = f"{scheme}:{target}"
    files = split_files(target) if scheme == "jsonl" else {}
    if files:
        return _named({name: corpus_lib.open_files(path, scheme, index_dir)
                       for name, path in files.items()}, split, where)
    corpus = corpus_lib.open_files(target, scheme, index_dir)
    if not len(corpus):
        return SplitSource([(corpus, [])])  # The caller says "empty corpus".
    if scheme == "text" or _only_all(split):
        # One split (text), or every record: nothing to read ahead.
        available = ("train",) if scheme == "text" else ("records",)
        parts = _select_parts(split, available, lambda n: range(len(corpus)), where)
        return SplitSource([(corpus, ix) for _, ix in parts])
    return SplitSource([(corpus, ix) for ix in _by_assignment(corpus, split, where)])


def _named(sources: dict, split: str, where: str) -> SplitSource:
    """`split` of a source whose splits are separate random-access sources {name: source}."""
    # Joined as one, each split a range of record indices.
    sizes = [len(c) for c in sources.values()]
    starts = dict(zip(sources, np.cumsum([0] + sizes)[:-1], strict=True))
    parts = _select_parts(split, tuple(sources),
                          lambda n: np.arange(len(sources[n])) + starts[n], where)
    joined = SplitSource([(c, np.arange(len(c))) for c in sources.values()])
    return SplitSource([(joined, ix) for _, ix in parts])


def _by_assignment(records, split: str, where: str, key=None) -> list[np.ndarray]:
    """The record indices of each '+' part of `split`, by `_assignment`."""
    names = _assignment(records, where, key)
    available = tuple(s for s in SPLITS if s in set(names))
    by_name = {s: np.flatnonzero(names == s) for s in available}
    return [ix for _, ix in _select_parts(split, available, lambda n: by_name[n], where)]


# ============================ HF datasets (optional) ==========================


def open_hf(path: str, split: str | None):
    """The records of `split` (default `train`) of `hf:PATH`, as a random-access source."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"hf: sources need HF datasets (pip install -e '.[hf]'): {e}") from e
    split, where = split or "train", f"hf:{path}"
    if not os.path.exists(path):
        raise FileNotFoundError(f"{where}: no such file or directory")
    try:
        dataset = datasets.load_from_disk(path)
    except FileNotFoundError:  # Not a saved dataset: data files, split by their names.
        dataset = datasets.load_dataset(path)
    if isinstance(dataset, datasets.DatasetDict):
        return _named(dict(dataset), split, where)
    if _only_all(split):
        return SplitSource([(dataset, np.arange(len(dataset)))])
    key = (where, dataset._fingerprint)  # (The dataset's content hash, as HF caches by.)
    return SplitSource([(dataset, ix) for ix in _by_assignment(dataset, split, where, key)])


def _only_all(split: str) -> bool:
    return all(name == ALL for name, _, _ in parse(split))


def _select_parts(split, available, items_of, where):
    """[(name, items)] for each '+' part of `split`, sliced; `items_of(name)`: a split's
    records (a list) or record indices (an int array or a range)."""
    out = []
    for name, start, end in parse(split):
        if name == ALL:
            names = available
        elif name in available:
            names = (name,)
        else:
            raise ValueError(f"{where} has no split {name!r}; its splits: "
                             f"{', '.join(available) or 'none'} (and {ALL})")
        chunks = [items_of(n) for n in names]
        if len(chunks) == 1:
            items = chunks[0]
        elif isinstance(chunks[0], np.ndarray):
            items = np.concatenate(chunks)
        else:
            items = [x for chunk in chunks for x in chunk]
        out.append((name, take(items, start, end)))
    return out


def _assignment(corpus, source: str, key=None) -> np.ndarray:
    """Each record's split name: its "split" field if the first record has one (then every
    record must), else `hash_split` of its text (said once). Cached per file version."""
    key = key or (tuple(corpus.paths), tuple(map(json.dumps, corpus._stamps)))
    if key in _assignments:
        return _assignments[key]
    first = corpus[0] if len(corpus) else {}
    by_field = "split" in first
    names = []
    for i in range(len(corpus)):
        record = corpus[i]
        if by_field:
            name = record.get("split")
            if name not in SPLITS:
                got = "no 'split' field" if "split" not in record else f"split {name!r}"
                raise ValueError(f"{where(corpus, i)}: {got}; the first record has one, so "
                                 f"every record needs one of {', '.join(SPLITS)}")
        else:
            name = hash_split(record_text(record))
        names.append(name)
    if not by_field and source not in _said:
        _said.add(source)
        print(f"{source}: no 'split' field and no file per split: "
              f"split by a hash of each record's text, 70 % train, 10 % validation, 20 % test",
              file=sys.stderr, flush=True)
    _assignments[key] = np.asarray(names, dtype=object)
    return _assignments[key]
