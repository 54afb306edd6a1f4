"""The training input pipeline, on grain: random-access sources, per-row streams, resumable.

What a global batch holds does not depend on how many processes read it (docs/DESIGN.md §5):
row `r` of every global batch of `G` rows comes from its own stream, and a process reads
only the rows of its block (`sharding.data_shard`), so two processes produce exactly the
rows one would, and read disjoint data.

  - The example order is grain's: `MapDataset.source(examples).shuffle(seed).repeat()`,
    a lazy permutation, re-drawn each epoch (O(1) memory whatever the corpus size). Global
    position `p` of that stream belongs to row `p % G`.
  - Supervised tasks (GLUE, SQuAD): row `r` of batch `b` is example `b * G + r`.
  - `pretrain` (T5 span corruption, docs/DESIGN.md §2 step 1): row `r` reads the documents at
    positions `r, r + G, r + 2G, ...`, tokenizes each (a per-record map), concatenates
    their tokens and splits them into chunks of `tokens_length` (t5's
    `reduce_concat_tokens` + `split_tokens`, as a streaming transform), and corrupts chunk
    `k` with its own generator `default_rng([seed, 1, r, k])` (a per-record seed), so the
    result depends on neither worker count nor order.

With `workers` > 1, grain worker processes (`mp_prefetch`) build the rows, worker `w` every
`W`-th row of this process, and the main process merges them: the same batches for any
worker count (each row is its own stream).

The iterator state is grain's: per row, the next document, the offset in it and the chunk
count (pretrain), or the next batch index (supervised); a few integers, JSON. A process
restores only its rows from a state that holds all of them (`gather_state` merges the
processes' states before a checkpoint), so a run may resume with another process count.

Example:
  >>> it = train_batches("text:/data/wiki/*.txt", "pretrain", tok, global_batch_size=64,
  ...                    max_input_length=224, max_target_length=32, seed=0)
  >>> batch = next(it)                 # dict of int32 [64, 224] / [64, 32] arrays
  >>> state = it.get_state()           # JSON; train_batches(..., state=state) resumes
"""
from __future__ import annotations

import atexit
import json
import math
import weakref
from collections.abc import Callable, Iterator, Sequence

import grain
import numpy as np

from variator_jax import data as data_lib
from variator_jax import splits as splits_lib

_NOISE_STREAM = 1  # As in data.py: the noise draws never share a stream with the shuffle.
_SHUFFLE_SALT = 0x5EED


# ================================== sources ===================================


class _Subset:
    """Records `indices` of a random-access `source` (a split slice, the labelled rows)."""

    def __init__(self, source, indices: Sequence[int]):
        self._source, self._indices = source, indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int):
        return self._source[int(self._indices[i])]


class _Located:
    """A pre-training source whose bad records name their place ("FILE:LINE: ...") when read:
    a corpus is not checked ahead, so the check comes with the record."""

    def __init__(self, source, task):
        self._source, self._task = source, task

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int):
        record = self._source[i]
        try:
            self._task.format(record)
        except ValueError as e:
            raise ValueError(f"{splits_lib.where(self._source, i)}: {e}") from None
        return record


def open_source(spec: str, split: str | None = None, data_dir: str | None = None,
                index_dir: str | None = None):
    """A random-access source (`len`, `[i]` -> example dict) for `spec`, without reading it.

    `text:` / `jsonl:` go through `corpus.IndexedCorpus` (files, directories, globs, gzip);
    `tfds:` through `tfds.data_source` when the dataset is stored for random access
    (ArrayRecord), else it is read whole (GLUE-sized sets); `builtin:` is small and in
    memory. `split` names splits and slices as in `data.read_source` ("train[:95%]"), the
    files' splits as `splits` finds them (default "train").
    """
    scheme, target, spec_split = data_lib.parse_source(spec)
    split = split if split is not None else spec_split
    if scheme in ("text", "jsonl"):
        source = splits_lib.open_split(scheme, target, split, index_dir)
    elif scheme == "hf":
        source = splits_lib.open_hf(target, split)
    elif scheme == "tfds":
        source = _tfds_source(target, split or "train", data_dir)
    else:
        source = data_lib.read_source(spec, split=split, data_dir=data_dir)
    if not len(source):
        where = f" (split {split!r})" if split else ""
        raise ValueError(f"empty corpus: {spec}{where} has no examples")
    return source


def _tfds_source(name: str, split: str, data_dir: str | None):
    """Random access where the dataset is ArrayRecord; else read whole (GLUE-sized sets)."""
    source = data_lib.tfds_random_access(name, split, data_dir)
    return source if source is not None else data_lib.read_tfds(name, split, data_dir)


# ============================ pretrain: one row ===============================


class _ChunkIterator(grain.DatasetIterator):
    """One row's chunks: documents' tokens concatenated, split every `length` tokens."""

    def __init__(self, docs: grain.MapDataset, length: int, corrupt: Callable, num_docs: int):
        super().__init__()
        self._docs, self._length, self._corrupt = docs, length, corrupt
        self._num_docs = num_docs
        self._doc = self._offset = self._chunks = 0
        self._tokens = None  # The current document's tokens, once read.

    def __next__(self):
        pieces, need, empty = [], self._length, 0
        while need:
            if self._tokens is None:
                self._tokens = self._docs[self._doc]
            piece = self._tokens[self._offset:self._offset + need]
            pieces.append(piece)
            need -= piece.size
            self._offset += piece.size
            empty = empty + 1 if not self._tokens.size else 0
            if empty > self._num_docs:  # A whole epoch and not one token.
                raise ValueError("empty corpus: the documents tokenize to 0 tokens")
            if self._offset >= self._tokens.size:
                self._doc, self._offset, self._tokens = self._doc + 1, 0, None
        k, self._chunks = self._chunks, self._chunks + 1
        return self._corrupt(np.concatenate(pieces), k)

    def get_state(self) -> dict:
        return {"doc": self._doc, "offset": self._offset, "chunks": self._chunks}

    def set_state(self, state: dict) -> None:
        self._doc, self._offset = int(state["doc"]), int(state["offset"])
        self._chunks, self._tokens = int(state["chunks"]), None


class _Chunks(grain.IterDataset):
    def __init__(self, docs: grain.MapDataset, length: int, corrupt: Callable, num_docs: int):
        super().__init__(docs)
        self._args = (docs, length, corrupt, num_docs)

    def __iter__(self):
        return _ChunkIterator(*self._args)


# ============================== local batches ================================


class _RowsIterator(grain.DatasetIterator):
    """Zips this process's row streams into local batches (`data.collate`), or, without
    `collate` (in a worker process), into {row: example} for the main process to merge."""

    def __init__(self, rows: dict[int, grain.DatasetIterator], collate: Callable | None):
        super().__init__(list(rows.values()))
        self._rows, self._collate = rows, collate

    def __next__(self):
        if self._collate is None:
            return {r: next(it) for r, it in self._rows.items()}
        return self._collate([next(it) for it in self._rows.values()])

    def get_state(self) -> dict:
        return {"rows": {str(r): it.get_state() for r, it in self._rows.items()}}

    def set_state(self, state: dict) -> None:
        missing = [r for r in self._rows if str(r) not in state["rows"]]
        if missing:
            raise ValueError(f"data state has no position for batch row {missing[0]}")
        for r, it in self._rows.items():
            it.set_state(state["rows"][str(r)])


class _Rows(grain.IterDataset):
    def __init__(self, rows: dict[int, grain.IterDataset], collate: Callable | None):
        super().__init__(list(rows.values()))
        self._row_datasets, self._collate = rows, collate

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """grain's split among `mp_prefetch` workers: worker w of W builds rows w::W."""
        del sequential_slice
        self._row_datasets = dict(list(self._row_datasets.items())[sl])

    def __iter__(self):
        return _RowsIterator({r: iter(ds) for r, ds in self._row_datasets.items()},
                             self._collate)


class _BatchIndexIterator(grain.DatasetIterator):
    """Supervised batches: row r of batch b is position b * G + r of `stream`."""

    def __init__(self, stream: grain.MapDataset, rows: range, global_batch_size: int,
                 collate: Callable):
        super().__init__()
        self._stream, self._rows, self._g = stream, rows, global_batch_size
        self._collate, self._batch = collate, 0

    def __next__(self):
        b, self._batch = self._batch, self._batch + 1
        return self._collate([self._stream[b * self._g + r] for r in self._rows])

    def get_state(self) -> dict:
        return {"rows": {"all": {"batch_index": self._batch}}}

    def set_state(self, state: dict) -> None:
        self._batch = int(state["rows"]["all"]["batch_index"])


class _BatchIndex(grain.IterDataset):
    def __init__(self, stream: grain.MapDataset, rows: range, global_batch_size: int,
                 collate: Callable):
        super().__init__(stream)
        self._args = (stream, rows, global_batch_size, collate)

    def __iter__(self):
        return _BatchIndexIterator(*self._args)


# ================================ the iterator ===============================


class TrainBatches:
    """Infinite, deterministic, resumable iterator over this process's local batches.

    Each `next` gives rows `data._local_rows(...)` of the next global batch (keys as in
    `data.collate`). `get_state()` is grain's iterator state plus the settings it is only
    valid for (checked by `set_state`) and `batch_index`, the number of batches taken.
    """

    def __init__(self, dataset: grain.IterDataset, checks: dict, state: dict | None = None,
                 prefetch: int = 2, block: str | None = None):
        if prefetch:  # A thread builds the next batches while the step runs (XLA frees the
            # GIL); its state is the consumer's position, in the parent's format.
            dataset = grain.experimental.ThreadPrefetchIterDataset(
                dataset, prefetch_buffer_size=prefetch)
        self._dataset, self._checks = dataset, checks
        # With worker processes grain's state nests one state per worker: it is kept whole,
        # under this process's block of rows, and restores with the same layout only.
        self._block = block
        self._iter = iter(dataset)
        # Stop the prefetch thread and drop the iterator before the interpreter tears
        # modules down (grain's own `__del__` would then fail noisily); a weak reference,
        # so that this never keeps an iterator alive.
        atexit.register(_close, weakref.ref(self))
        self._batch_index = 0
        if state is not None:
            self.set_state(state)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iter)
        self._batch_index += 1
        return batch

    @property
    def checks(self) -> dict:
        """The settings the stream's state is only valid for (`num_examples`, `seed`, ...)."""
        return dict(self._checks)

    def get_state(self) -> dict:
        grain_state = self._iter.get_state()
        if self._block is not None:
            grain_state = {"rows": {self._block: grain_state}}
        return {"batch_index": self._batch_index, **self._checks, "grain": grain_state}

    def set_state(self, state: dict) -> None:
        """Continues from `state`; refuses one taken on other data or settings."""
        for key, mine in self._checks.items():
            if key in state and state[key] != mine:
                raise ValueError(f"data state mismatch: {key} is {mine} now but "
                                 f"{state[key]} in the checkpoint being resumed: the data or "
                                 "its batching changed since the run began, and the saved "
                                 "position means nothing on it; restore the data as it was, "
                                 "or use another --workdir")
        if "grain" not in state:
            raise ValueError("data state has no grain iterator state (a checkpoint of an "
                             "older version?); use another --workdir")
        grain_state = state["grain"]
        if self._block is not None:
            if self._block not in grain_state["rows"]:
                raise ValueError(f"data state has no position for rows {self._block} with "
                                 f"{self._checks['workers']} workers: resume with the "
                                 "process count and data.workers it was saved with")
            grain_state = grain_state["rows"][self._block]
        self._iter.set_state(grain_state)
        self._batch_index = int(state["batch_index"])


def _close(ref) -> None:
    batches = ref()
    if batches is not None and batches._iter is not None:
        batches._iter.close()
        batches._iter = None  # Collected now, while grain's modules are still there.


def gather_state(state: dict) -> dict:
    """Every process's rows in one state (call on all processes at once, e.g. before a
    checkpoint), so that any process, under any process count, finds its rows there."""
    import jax
    if jax.process_count() == 1:
        return state
    from jax.experimental import multihost_utils
    raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([raw.size], np.int64))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[:raw.size] = raw
    everyone = multihost_utils.process_allgather(padded)
    merged = dict(state, grain={"rows": {}})
    for size, buf in zip(np.ravel(sizes), everyone, strict=True):
        merged["grain"]["rows"].update(json.loads(bytes(buf[:int(size)]))["grain"]["rows"])
    return merged


def _shuffle_seed(seed: int) -> int:
    return int(np.random.default_rng([int(seed), _SHUFFLE_SALT]).integers(2 ** 32))


def train_batches(spec: str, task, tokenizer, *, global_batch_size: int,
                  max_input_length: int, max_target_length: int, seed: int,
                  data_dir: str | None = None, split: str | None = None,
                  process_index: int = 0, process_count: int = 1,
                  state: dict | None = None, index_dir: str | None = None,
                  prefetch: int = 2, workers: int = 0,
                  noise=data_lib.NOISE, unlabelled: bool = False) -> TrainBatches:
    """Infinite training batches of `task` on `spec` for this process; see the module
    docstring for what each row holds. Nothing is read or tokenized ahead of the batches
    but `prefetch` batches built in a background thread (classification checks labels
    once, to leave out unlabelled rows). `index_dir`: where file indices are cached
    (default: the user's cache, `corpus.py`). `workers` > 0 (pretrain): grain worker
    processes (`mp_prefetch`) build the rows, worker w every W-th row of this process;
    the batches are the same for any number of workers. `noise`: (density, mean span
    length) of `pretrain`'s span corruption (T5's 0.15 and 3 by default). `unlabelled`
    (classification): keep the rows with label -1, for a loss that needs no label (hidden-state
    distillation); their target is EOS alone and their `label` -1."""
    task = data_lib.get_task(task)
    eos_id = data_lib.check_tokenizer(tokenizer)
    if min(max_input_length, max_target_length) < 2:
        raise ValueError(f"max_input_length and max_target_length must be >= 2, got "
                         f"{max_input_length}, {max_target_length}")
    rows = data_lib.local_rows(global_batch_size, process_index, process_count)
    if split is None and task.kind == "pretrain" and data_lib.parse_source(spec)[2] is None:
        split = splits_lib.ALL  # A pre-training corpus is read whole, nothing read ahead.
    source = open_source(spec, split=split, data_dir=data_dir, index_dir=index_dir)
    unlabelled_rows = 0
    if task.kind != "pretrain":  # Supervised sets are checked whole before training.
        data_lib.check_examples(task, source, spec)
    else:
        source = _Located(source, task)
    if task.kind == "classification":
        # GLUE test splits have label -1: nothing to learn unless the loss needs no label.
        has_label = np.asarray([task.label_index(source[i]) != -1 for i in range(len(source))])
        if unlabelled:
            unlabelled_rows = int(np.sum(~has_label))
        elif not has_label.any():
            raise ValueError(f"{task.name}: no labelled examples (GLUE test splits have "
                             f"label -1)")
        else:
            source = _Subset(source, np.flatnonzero(has_label))
    stream = grain.MapDataset.source(source).shuffle(seed=_shuffle_seed(seed)).repeat()
    lengths = (max_input_length, max_target_length)

    def collate(rows_):
        return data_lib.collate(rows_, *lengths, task.kind == "classification")

    block = None
    if task.kind == "pretrain":
        workers = min(int(workers), len(rows))
        noise = data_lib.check_noise(noise)
        dataset = _pretrain_rows(stream, len(source), task, tokenizer, eos_id, rows,
                                 global_batch_size, seed, lengths, noise,
                                 None if workers > 1 else collate)
        if workers > 1:
            def merge(parts):  # One {row: example} from each worker -> the local batch.
                merged = {r: row for part in parts for r, row in part.items()}
                return collate([merged[r] for r in rows])
            from absl import flags
            if not flags.FLAGS.is_parsed():  # grain reads its absl flags (defaults here:
                flags.FLAGS.mark_as_parsed()  # a library call, not an absl program).
            dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
            dataset = dataset.batch(workers, batch_fn=merge)
            block = f"{rows.start}:{rows.stop}"
    else:
        def make_row(example):
            inputs, targets = task.format(example)
            label = task.label_index(example) if task.kind == "classification" else None
            return (data_lib.encode_text(tokenizer, inputs, max_input_length, eos_id),
                    data_lib.encode_text(tokenizer, targets, max_target_length, eos_id), label)
        dataset = _BatchIndex(stream.map(make_row), rows, global_batch_size, collate)
    checks = {"seed": int(seed), "num_examples": len(source),
              "global_batch_size": global_batch_size}
    if task.kind == "pretrain":  # Resuming with other noise would change the rows seen.
        checks["noise"] = list(noise)
    if unlabelled_rows:
        checks["unlabelled"] = int(unlabelled_rows)
    if block is not None:
        checks["workers"] = workers
    return TrainBatches(dataset, checks, state, prefetch, block)


def _pretrain_rows(stream, num_docs, task, tokenizer, eos_id, rows, global_batch_size, seed,
                   lengths, noise, collate):
    tokens_length = data_lib.random_spans_tokens_length(*lengths, *noise)
    # The longest chunk has the most spans (counts never shrink with length).
    sentinels = data_lib.sentinel_ids(tokenizer, data_lib.noise_counts(tokens_length, *noise)[1])

    def tokenize(example) -> np.ndarray:
        ids = tokenizer.encode(task.format(example)[0], add_special_tokens=False, verbose=False)
        return np.asarray(ids, np.int32)

    def corrupter(row: int):
        def corrupt(chunk, k):
            rng = np.random.default_rng([int(seed), _NOISE_STREAM, row, k])
            inputs, targets = data_lib.span_corruption(chunk, rng, *noise, sentinels, eos_id)
            return inputs, targets, None
        return corrupt

    docs = stream.map(tokenize)
    return _Rows({r: _Chunks(docs[r::global_batch_size], tokens_length, corrupter(r), num_docs)
                  for r in rows}, collate)


# ================================= evaluation ==================================


class EvalBatches:
    """One in-order pass over an eval set per iteration; re-iterable.

    The last global batch is padded with all-zero rows of `weight` 0; `index`
    gives each row's example index (-1 for padding), into `references`.
    """

    def __init__(self, make_row: Callable[[int, int], data_lib.Row], num_examples: int,
                 references: list[list[str]] | None, *, global_batch_size: int,
                 process_index: int = 0, process_count: int = 1, max_input_length: int,
                 max_target_length: int, with_label: bool):
        self._make_row, self.num_examples, self.references = make_row, num_examples, references
        self._rows = data_lib.local_rows(global_batch_size, process_index, process_count)
        self._global_batch_size = global_batch_size
        self._lengths = (max_input_length, max_target_length)
        self._with_label = with_label
        self._cache: dict[int, data_lib.Row] = {}  # Eval runs many times; tokenize once.
        self.num_batches = math.ceil(num_examples / global_batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def _row(self, index: int) -> data_lib.Row:
        if index not in self._cache:
            self._cache[index] = self._make_row(index, 0)
        return self._cache[index]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for b in range(self.num_batches):
            indices = [b * self._global_batch_size + r for r in self._rows]
            real = [i < self.num_examples for i in indices]
            rows = [self._row(i) if ok else None for i, ok in zip(indices, real, strict=True)]
            batch = data_lib.collate(rows, *self._lengths, self._with_label)
            batch["weight"] = np.asarray(real, np.float32)
            batch["index"] = np.asarray(
                [i if ok else -1 for i, ok in zip(indices, real, strict=True)], np.int32)
            yield batch


def eval_batches(spec: str, task, tokenizer, *, global_batch_size: int,
                 max_input_length: int, max_target_length: int, seed: int = 0,
                 data_dir: str | None = None, split: str | None = None,
                 process_index: int = 0, process_count: int = 1,
                 noise=data_lib.NOISE) -> EvalBatches:
    """One pass over the eval split (default: the spec's split, else the task's,
    "validation" / mnli "validation_matched"), per-process sliced like
    `train_batches`, plus `weight` (float32, 0 = padding) and `index` (int32).
    `seed` and `noise` (density, mean span length) only shape `pretrain`'s span corruption.
    """
    task = data_lib.get_task(task)
    split = data_lib.eval_split(spec, task, split)
    source = open_source(spec, split=split, data_dir=data_dir)
    if task.kind != "pretrain":
        data_lib.check_examples(task, source, spec)
    examples = [source[i] for i in range(len(source))]
    make_row, n, references = data_lib.row_maker(
        task, tokenizer, examples, max_input_length=max_input_length,
        max_target_length=max_target_length, seed=seed, noise=noise)
    return EvalBatches(make_row, n, references, global_batch_size=global_batch_size,
                       process_index=process_index, process_count=process_count,
                       max_input_length=max_input_length, max_target_length=max_target_length,
                       with_label=task.kind == "classification")
