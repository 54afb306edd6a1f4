"""Data pipelines: sources, T5 text-to-text tasks, span corruption, batches.

Everything here is host-side numpy; the training code turns a process's local
batch into a global array with `jax.make_array_from_process_local_data`.

Sources are strings: `text:PATH`, `jsonl:PATH`, `tfds:NAME[/CONFIG][:SPLIT]`,
`builtin:pydoc`. Tasks are `pretrain` (T5 span corruption, docs/DESIGN.md §2 step 1),
the GLUE tasks `mnli qqp qnli sst2 rte mrpc` and `squad` (v1.1), all
text-to-text as in the T5 paper.

Example:
  >>> tok = load_tokenizer("byte")
  >>> it = train_batches("builtin:pydoc", "pretrain", tok, global_batch_size=8,
  ...                    max_input_length=224, max_target_length=32, seed=0)
  >>> batch = next(it)               # dict of int32 arrays
  >>> batch["input_ids"].shape, batch["labels"].shape
  ((8, 224), (8, 32))
  >>> state = it.get_state()         # JSON-serialisable; pass as `state=` to resume

The training stream itself (grain, indexed files, per-row streams) is `pipeline.py`;
random access to large files is `corpus.py`.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from variator_jax import splits, stdlib_docs, task_file

# T5 span corruption (Raffel et al. 2020, §3.1.4); Variator pre-trains its
# plugins with the same objective (docs/DESIGN.md §2).
NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0
NOISE = (NOISE_DENSITY, MEAN_NOISE_SPAN_LENGTH)  # The `noise=` default of the batch builders.
# T5 convention: pad id 0, and the decoder starts from the pad id.
PAD_ID = 0
DECODER_START_ID = 0

KNOWN_SCHEMES = ("text", "jsonl", "tfds", "builtin", "hf")
_SOURCE_FORMS = ("text:PATH, jsonl:PATH, tfds:NAME[/CONFIG][:SPLIT], builtin:pydoc, "
                 "builtin:stdlib_docs, hf:PATH")
_BUILTINS = ("pydoc", "stdlib_docs")
# The per-example noise draws from its own random stream, never the shuffle's.
_NOISE_STREAM = 1

Row = tuple  # (input ids [<= max_in], target ids [<= max_tgt], class index or None)


# ================================ tokenizers ==================================

_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")


def load_tokenizer(spec: str | None = None, backbone_dir: str | None = None):
    """Returns an HF tokenizer: `"byte"` (ByT5, no files), a local path, or None.

    None means the tokenizer saved next to the backbone in `backbone_dir`.
    Nothing is fetched from a model hub.

    >>> tok = load_tokenizer("byte")
    >>> tok.eos_token_id, tok.pad_token_id, tok.convert_tokens_to_ids("<extra_id_0>")
    (1, 0, 259)
    """
    import transformers  # Heavy; only the pipelines need it.

    if spec == "byte":
        return transformers.ByT5Tokenizer()
    if spec is None:
        if backbone_dir is None:
            raise ValueError("no tokenizer: give tokenizer='byte', a tokenizer path, "
                             "or a backbone_dir that holds one")
        if not any(os.path.exists(os.path.join(backbone_dir, f)) for f in _TOKENIZER_FILES):
            raise FileNotFoundError(
                f"backbone dir {backbone_dir} has no tokenizer (none of "
                f"{', '.join(_TOKENIZER_FILES)}); pass tokenizer='byte' or a tokenizer path")
        path = backbone_dir
    else:
        path = spec
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"tokenizer path not found: {path} (use 'byte' for the ByT5 byte tokenizer)")
    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load a tokenizer from {path}: {first_line}") from e


def check_tokenizer(tokenizer) -> int:
    """Returns the EOS id; the batches below assume T5's pad id 0."""
    if tokenizer.pad_token_id != PAD_ID or tokenizer.eos_token_id is None:
        raise ValueError(f"expected a T5 tokenizer (pad id 0, an EOS token), got pad id "
                         f"{tokenizer.pad_token_id}, eos id {tokenizer.eos_token_id}")
    return tokenizer.eos_token_id


def encode_text(tokenizer, text: str, max_length: int, eos_id: int) -> np.ndarray:
    """Token ids of `text` + EOS, truncated so that EOS stays last. -> int32 [<= max_length]."""
    ids = tokenizer.encode(text, add_special_tokens=False, verbose=False)
    return np.asarray(list(ids[: max_length - 1]) + [eos_id], np.int32)


# ================================== sources ===================================


def parse_source(spec: str) -> tuple[str, str, str | None]:
    """Splits a source spec: 'tfds:glue/sst2:validation' -> ('tfds', 'glue/sst2', 'validation').

    Only tfds specs carry a split; a PATH is everything after the first colon.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"data source {spec!r} has no scheme; expected one of {_SOURCE_FORMS}")
    scheme, _, rest = spec.partition(":")
    if scheme not in KNOWN_SCHEMES:
        raise ValueError(f"unknown data source scheme {scheme!r} in {spec!r}; "
                         f"known schemes: {', '.join(KNOWN_SCHEMES)}")
    if scheme == "tfds":
        # tfds names have no colon, but split slices do ("train[:10%]").
        name, _, split = rest.partition(":")
        rest = name
    else:
        split = ""
    if not rest:
        raise ValueError(f"data source {spec!r} names nothing after '{scheme}:'")
    return scheme, rest, split or None


def read_source(spec: str, split: str | None = None, data_dir: str | None = None) -> list[dict]:
    """Reads one split of a source into memory as a list of example dicts.

    Args:
      spec: `text:PATH` (documents separated by blank lines -> {"text"}),
        `jsonl:PATH` (one JSON object per line); PATH may be a directory or a glob of
        files, plain or gzip (see `corpus`); `tfds:NAME[/CONFIG][:SPLIT]`
        (a prepared tfds dataset under `data_dir`; strings decoded to str,
        arrays to lists), `builtin:pydoc` (CPython's `pydoc_data.topics`,
        values in sorted-key order -> {"text"}), `builtin:stdlib_docs` (the
        standard library's docstrings labelled by package, splits train /
        validation / test / unlabeled: `variator_jax.stdlib_docs`) or `hf:PATH` (an
        HF `datasets` dataset saved to disk, or a directory of data files).
      split: overrides the spec's split; default "train". A name, a tfds-style slice
        ("train[:90%]", "validation[-100:]"), several joined by "+", or "all". Where
        file sources get their splits (a `jsonl:DIR` of train/validation/test.jsonl, a
        "split" field, a hash of the text; `text:` has `train` only): `splits`. A split
        the source does not have is an error.
      data_dir: tfds data directory.

    Returns:
      list of dicts, never empty.
    """
    scheme, target, spec_split = parse_source(spec)
    split = split if split is not None else spec_split
    if scheme == "tfds":
        examples = read_tfds(target, split or "train", data_dir)
    elif (scheme, target) == ("builtin", "stdlib_docs"):  # Has named splits, as tfds does.
        examples = splits.select(split or "train", stdlib_docs.SPLITS + (stdlib_docs.UNLABELED,),
                                 stdlib_docs.read, spec)
    elif scheme == "builtin":
        examples = splits.select(split or "train", ("train",),
                                 lambda _: _read_builtin(target), spec)
    else:  # Eval sets are small: the indexed files' records, all in memory.
        records = (splits.open_hf(target, split) if scheme == "hf"
                   else splits.open_split(scheme, target, split))
        examples = [records[i] for i in range(len(records))]
    if not examples:
        where = f" (split {split!r})" if split else ""
        raise ValueError(f"empty corpus: {spec}{where} has no examples")
    return examples


def _read_builtin(name: str) -> list[dict]:
    if name not in _BUILTINS:
        raise ValueError(f"unknown builtin corpus {name!r}; known: {', '.join(_BUILTINS)}")
    # English prose that ships with every CPython: a corpus needing no download.
    from pydoc_data.topics import topics
    return [{"text": topics[k].strip()} for k in sorted(topics) if topics[k].strip()]


def read_tfds(name: str, split: str, data_dir: str | None) -> list[dict]:
    source = tfds_random_access(name, split, data_dir)
    if source is not None:  # The same records, in the same order, as training reads them.
        return [source[i] for i in range(len(source))]
    tfds = _import_tfds()
    try:
        ds = tfds.load(name, split=split, data_dir=data_dir, download=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"unknown tfds dataset {name!r}") from None
    except AssertionError as e:  # tfds's way of saying "not prepared".
        raise FileNotFoundError(
            f"tfds dataset {name} is not prepared in data_dir={data_dir}; prepare it "
            f"where there is network (tfds build {name})") from e
    except ValueError as e:
        raise ValueError(f"tfds {name}: {str(e).strip().splitlines()[0]}") from e
    return [_to_python(x) for x in tfds.as_numpy(ds)]


class _TfdsRecords:
    """A `tfds.data_source` whose records come out as JSON-like Python (bytes -> str)."""

    def __init__(self, source):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int):
        return _to_python(self._source[int(i)])


def tfds_random_access(name: str, split: str, data_dir: str | None):
    """`tfds.data_source` of a dataset prepared as ArrayRecord (random access, nothing read
    ahead), or None where it is not (tfrecord, tfds's default: read it with tf.data)."""
    tfds = _import_tfds()
    try:
        return _TfdsRecords(tfds.data_source(name, split=split, data_dir=data_dir,
                                             download=False))
    except Exception:  # Not prepared, unknown, or not ArrayRecord: tfds.load says which.
        return None


def _import_tfds():
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(f"tfds sources need tensorflow and tensorflow-datasets "
                          f"(pip install -e '.[tfds]'): {e}") from e
    try:
        # JAX owns the accelerator; TF only reads files (big_vision does this).
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass  # TF already initialised its devices; nothing to do then.
    return tfds


def _to_python(x: Any) -> Any:
    """tfds numpy values -> JSON-like Python (bytes -> str, arrays -> lists)."""
    if isinstance(x, dict):
        return {k: _to_python(v) for k, v in x.items()}
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, np.ndarray):  # (tfds.data_source gives scalars as 0-d arrays.)
        return x.item() if x.ndim == 0 else [_to_python(v) for v in x.tolist()]
    if isinstance(x, np.generic):
        return x.item()
    return x


# =================================== tasks ====================================


@dataclasses.dataclass(frozen=True)
class Task:
    """A text-to-text task, as a declaration gives it (`task_file`: a JSON file or a built-in).

    Attributes:
      name: task name (also the T5 input prefix, unless `prefix` says otherwise).
      kind: "pretrain", "classification" or "generation".
      labels: label strings in tfds's ClassLabel order; None unless classification.
      features: text fields joined into the input, in T5's order.
      eval_split: default split for evaluation.
      prefix: what starts the input; None: the name.
      metrics: classification metrics ("accuracy", "f1"), the headline first.
      origin: where it was declared ("built-in task sst2", "task file x.json"), for errors.
    """
    name: str
    kind: str
    labels: list[str] | None = None
    features: tuple[str, ...] = ()
    eval_split: str = "validation"
    prefix: str | None = None
    metrics: tuple[str, ...] = ("accuracy",)
    origin: str = dataclasses.field(default="", compare=False)

    def format(self, example: dict) -> tuple[str, str]:
        """Example dict -> (inputs text, targets text).

        A generic `{"inputs", "targets"}` example passes through for any task
        but pretrain. Otherwise t5's `preprocessors.glue`: the prefix (the task
        name), then "key: value" for each feature, labels as words; an
        unlabelled example (label -1) has the empty target (EOS alone once encoded).
        SQuAD is t5's `preprocessors.squad` (include_context=True) so, with no prefix,
        minus its punctuation padding: references stay the original answer strings.
        """
        if self.kind == "pretrain":
            return _field(self, example, "text"), ""
        if "inputs" in example and "targets" in example:
            return _field(self, example, "inputs"), _field(self, example, "targets")
        parts = [self.name if self.prefix is None else self.prefix]
        for key in self.features:
            parts += [f"{key}:", _field(self, example, key)]
        inputs = " ".join(p for p in parts if p)
        if self.kind == "classification":
            label = self.label_index(example)
            return inputs, self.labels[label] if label >= 0 else ""
        answers = self.references(example)
        return inputs, answers[0] if answers else ""

    def label_index(self, example: dict) -> int:
        """Class index of a classification example; -1 when unlabelled (GLUE test)."""
        if "label" in example:
            label = example["label"]
        elif "targets" in example:
            label = example["targets"]
        else:
            raise ValueError(f"{self.name} example has no 'label' field (has: "
                             f"{', '.join(sorted(example))})")
        if isinstance(label, str):
            if label not in self.labels:
                raise ValueError(f"{self.name}: unknown label {label!r}; known: "
                                 f"{', '.join(self.labels)}")
            return self.labels.index(label)
        # bool is an int in Python and a float would be truncated: both are refused.
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            raise ValueError(f"{self.name}: field 'label' must be an integer class index or a "
                             f"label string, got {type(label).__name__} {label!r}")
        if not -1 <= int(label) < len(self.labels):
            raise ValueError(f"{self.name}: field 'label' {label} out of range "
                             f"[-1, {len(self.labels)})")
        return int(label)

    def references(self, example: dict) -> list[str]:
        """All acceptable target strings (SQuAD keeps every answer for EM/F1)."""
        if self.kind == "classification":
            return [self.labels[self.label_index(example)]]
        if self.kind == "generation" and "answers" in example:
            answers = example["answers"]
            # tfds/HF: {"text": [...], "answer_start": [...]}; also a plain list.
            answers = answers["text"] if isinstance(answers, dict) else answers
            return [answers] if isinstance(answers, str) else [str(a) for a in answers]
        if "targets" in example:
            return [_field(self, example, "targets")]
        return []

    def verbalizer_ids(self, tokenizer) -> np.ndarray:
        """Token id of each label's first token. -> int32 [num_labels].

        Classification reads the decoder's logits over these ids at the first
        target position, so they must be distinct.
        """
        if self.labels is None:
            raise ValueError(f"task {self.name} has no labels: verbalizers are for "
                             f"classification tasks")
        first = [tokenizer.encode(label, add_special_tokens=False)[0] for label in self.labels]
        for i in range(len(first)):
            for j in range(i):
                if first[i] == first[j]:
                    raise ValueError(f"{self.origin or self.name}: labels {self.labels[j]!r} "
                                     f"and {self.labels[i]!r} share their first token (id "
                                     f"{first[i]}); the classifier reads one token per label")
        return np.asarray(first, np.int32)


def _field(task: Task, example: dict, key: str) -> str:
    """A text field: present and a string (null, a number or a list is refused, not str()-ed)."""
    if key not in example:
        raise ValueError(f"{task.name} example lacks field {key!r} (has: "
                         f"{', '.join(sorted(example))})")
    value = example[key]
    if not isinstance(value, str):
        raise ValueError(f"{task.name}: field {key!r} must be a string, got "
                         f"{'null' if value is None else type(value).__name__} {value!r}"[:200])
    return value


def check_examples(task: Task, source, where: str) -> None:
    """Formats every example of `source` once (text fields strings, labels valid), so that
    bad records stop the run before training, with their place: 'FILE:LINE: ...'."""
    for i in range(len(source)):
        example = source[i]  # (A corpus error names its place itself.)
        try:
            task.format(example)
            if task.kind == "classification":
                task.label_index(example)
        except ValueError as e:
            place = splits.where(source, i)
            place = f"{where} {place}" if place.startswith("record") else place
            raise ValueError(f"{place}: {e}") from None


# The built-in tasks: declarations as a task file holds them (task_file.BUILTIN).
TASKS = {"pretrain": Task("pretrain", "pretrain", eval_split=splits.ALL, origin="built-in task"),
         **{name: Task(**task_file.parse(dict(d, name=name), f"built-in task {name}"))
            for name, d in task_file.BUILTIN.items()}}


def get_task(name: str | Task) -> Task:
    """The task called `name`, or declared by the JSON task file at `name` (`task_file`);
    a Task passes through."""
    if isinstance(name, Task):
        return name
    if task_file.is_task_file(name):
        return Task(**task_file.read(name))
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}, or a JSON "
                         f"task file (PATH.json)")
    return TASKS[name]


# ============================ T5 span corruption ==============================
# A numpy restatement of google-research/text-to-text-transfer-transformer,
# t5/data/preprocessors.py: `random_spans_noise_mask`,
# `noise_span_to_unique_sentinel`, `nonnoise_span_to_unique_sentinel` and
# `random_spans_helper`. TF's stateless shuffles become draws from `rng`.


def noise_counts(length: int, noise_density: float, mean_noise_span_length: float):
    """(num_noise_tokens, num_noise_spans) exactly as `random_spans_noise_mask` picks them.

    float32 and round-half-to-even, as tf.round on float32 does.
    """
    length = max(length, 2)  # t5: "increase length to avoid degeneracy".
    num_noise = int(np.round(np.float32(length) * np.float32(noise_density)))
    num_noise = min(max(num_noise, 1), length - 1)  # At least one noise and one non-noise token.
    num_spans = int(np.round(np.float32(num_noise) / np.float32(mean_noise_span_length)))
    return num_noise, max(num_spans, 1)


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator):
    """Random split of `num_items` into `num_segments` non-empty parts. -> int [num_segments]."""
    if not 1 <= num_segments <= num_items:
        raise ValueError(f"cannot split {num_items} tokens into {num_segments} non-empty spans")
    first_in_segment = np.concatenate(
        [[0], rng.permutation(np.arange(num_items - 1) < num_segments - 1).astype(np.int64)])
    return np.bincount(np.cumsum(first_in_segment), minlength=num_segments)


def random_spans_noise_mask(length: int, rng: np.random.Generator,
                            noise_density: float = NOISE_DENSITY,
                            mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> np.ndarray:
    """T5's noise mask: alternating non-noise / noise spans, non-noise first. -> bool [length].

    round(length * noise_density) noise tokens in round(that / mean span) spans;
    subject to that, every mask is equally likely.
    """
    if noise_density == 0.0:
        return np.zeros(length, bool)
    orig_length, length = length, max(length, 2)
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    nonnoise_lengths = _random_segmentation(length - num_noise, num_spans, rng)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
    span_starts = np.cumsum(interleaved)[:-1]  # Strictly increasing: spans are non-empty.
    span_start_indicator = np.zeros(length, np.int64)
    span_start_indicator[span_starts] = 1
    is_noise = np.cumsum(span_start_indicator) % 2 == 1
    return is_noise[:orig_length]


def noise_span_to_unique_sentinel(tokens: np.ndarray, noise_mask: np.ndarray,
                                  sentinel_ids: np.ndarray) -> np.ndarray:
    """Replaces the i-th run of noise tokens by sentinel_ids[i]. -> int32 [<= len(tokens)].

    t5 counts sentinels down from the vocabulary's end, which in T5's
    SentencePiece vocabulary is <extra_id_0>, <extra_id_1>, ...; naming them
    through `sentinel_ids` also fits vocabularies that count up (ByT5 in HF).
    """
    prev_is_noise = np.concatenate([[False], noise_mask[:-1]])
    first_noise = noise_mask & ~prev_is_noise
    subsequent_noise = noise_mask & prev_is_noise
    span_index = np.cumsum(first_noise) - 1
    if span_index[-1] >= len(sentinel_ids):
        raise ValueError(f"{span_index[-1] + 1} noise spans but only {len(sentinel_ids)} sentinels")
    out = np.where(first_noise, sentinel_ids[np.maximum(span_index, 0)], tokens)
    return out[~subsequent_noise].astype(np.int32)


def span_corruption(tokens, rng: np.random.Generator, noise_density: float,
                    mean_noise_span_length: float, sentinel_ids, eos_id: int):
    """T5 span corruption of one chunk of token ids.

    Args:
      tokens: int [length], length >= 1, no EOS.
      rng: numpy Generator; the only source of randomness.
      noise_density, mean_noise_span_length: 0.15 and 3.0 in T5.
      sentinel_ids: int [>= num spans]; sentinel_ids[i] is <extra_id_i>'s id.
      eos_id: appended to both outputs.

    Returns:
      (inputs, targets), int32: inputs = the tokens with each noise span
      replaced by its sentinel; targets = each sentinel followed by the span
      it replaced. Both end with EOS. E.g. "a b c d e" with noise "c d" ->
      inputs "a b <0> e </s>", targets "<0> c d </s>" (T5 paper, Fig. 2).
    """
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 1 or tokens.size == 0:
        raise ValueError(f"span_corruption needs a non-empty 1-d token array, got shape "
                         f"{tokens.shape}")
    sentinel_ids = np.asarray(sentinel_ids, np.int32)
    noise_mask = random_spans_noise_mask(tokens.size, rng, noise_density, mean_noise_span_length)
    inputs = noise_span_to_unique_sentinel(tokens, noise_mask, sentinel_ids)
    # t5's nonnoise_span_to_unique_sentinel: the same with the mask inverted.
    targets = noise_span_to_unique_sentinel(tokens, ~noise_mask, sentinel_ids)
    eos = np.asarray([eos_id], np.int32)
    return np.concatenate([inputs, eos]), np.concatenate([targets, eos])


def span_corruption_lengths(tokens_length: int, noise_density: float = NOISE_DENSITY,
                            mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH):
    """(inputs length, targets length), EOS included, after corrupting tokens_length >= 2 tokens."""
    num_noise, num_spans = noise_counts(tokens_length, noise_density, mean_noise_span_length)
    # Inputs: non-noise tokens + one sentinel per noise span + EOS; targets:
    # noise tokens + one sentinel per span + EOS (t5 `random_spans_helper`).
    return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1


def random_spans_tokens_length(max_input_length: int, max_target_length: int,
                               noise_density: float = NOISE_DENSITY,
                               mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> int:
    """Longest raw chunk whose corruption fits both lengths.

    t5's `random_spans_helper` grows the chunk while the inputs fit; here the
    targets must fit too (Variator: 224 / 32 -> 156 tokens, targets full).
    Both lengths never shrink as the chunk grows, so shorter chunks fit too.
    """
    def fits(n):
        n_in, n_tgt = span_corruption_lengths(n, noise_density, mean_noise_span_length)
        return n_in <= max_input_length and n_tgt <= max_target_length

    if not fits(2):
        raise ValueError(f"max_input_length={max_input_length}, max_target_length="
                         f"{max_target_length} are too short for span corruption")
    tokens_length = 2
    while fits(tokens_length + 1):
        tokens_length += 1
    return tokens_length


def sentinel_ids(tokenizer, count: int) -> np.ndarray:
    """Ids of <extra_id_0> .. <extra_id_{count-1}>. -> int32 [count]."""
    ids = [tokenizer.convert_tokens_to_ids(f"<extra_id_{i}>") for i in range(count)]
    missing = [i for i, t in enumerate(ids) if t is None or t == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"tokenizer has no <extra_id_{missing[0]}> token; span corruption "
                         f"needs {count} sentinels <extra_id_0> .. <extra_id_{count - 1}>")
    return np.asarray(ids, np.int32)


def _pretrain_chunks(texts: Sequence[str], tokenizer, tokens_length: int) -> list[np.ndarray]:
    """Documents -> one token stream -> chunks of tokens_length (the last may be shorter).

    t5's `span_corruption` concatenates tokenized documents without a
    separator (`reduce_concat_tokens`) and splits them (`split_tokens`), so
    no example is padding-heavy. A 1-token tail is dropped: its corruption
    is degenerate (t5 masks nothing of it).
    """
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    stream = np.concatenate([np.asarray(x, np.int32) for x in ids] + [np.zeros(0, np.int32)])
    if stream.size < 2:
        raise ValueError(f"empty corpus: the documents tokenize to {stream.size} tokens")
    chunks = [stream[i:i + tokens_length] for i in range(0, stream.size, tokens_length)]
    return [c for c in chunks if c.size >= 2]


# ================================= batching ===================================


def check_noise(noise) -> tuple[float, float]:
    """(noise density, mean noise span length), validated. -> floats."""
    density, span = (float(x) for x in noise)
    if not 0.0 < density < 1.0 or span < 1.0:
        raise ValueError(f"span corruption needs 0 < noise_density < 1 and "
                         f"mean_noise_span_length >= 1, got {density} and {span}")
    return density, span


def row_maker(task: Task, tokenizer, examples: list[dict], *, max_input_length: int,
               max_target_length: int, seed: int, noise=NOISE):
    """-> (make_row(index, epoch) -> Row, number of examples, references or None).

    Rows are built lazily, so a process only tokenizes (and corrupts) its own.
    `noise`: (density, mean span length) of `pretrain`'s span corruption.
    """
    eos_id = check_tokenizer(tokenizer)
    if min(max_input_length, max_target_length) < 2:
        raise ValueError(f"max_input_length and max_target_length must be >= 2, got "
                         f"{max_input_length}, {max_target_length}")
    if task.kind == "pretrain":
        noise = check_noise(noise)
        tokens_length = random_spans_tokens_length(max_input_length, max_target_length, *noise)
        chunks = _pretrain_chunks([task.format(ex)[0] for ex in examples], tokenizer, tokens_length)
        # The longest chunk has the most spans (counts never shrink with length).
        sentinels = sentinel_ids(tokenizer, noise_counts(tokens_length, *noise)[1])

        def make_pretrain_row(index, epoch):
            # Seeded per (example, epoch): independent of batch size, order
            # and process count, so a resumed or re-sharded run sees the same.
            rng = np.random.default_rng([seed, _NOISE_STREAM, epoch, index])
            inputs, targets = span_corruption(chunks[index], rng, *noise, sentinels, eos_id)
            return inputs, targets, None

        return make_pretrain_row, len(chunks), None

    if task.kind == "classification":
        # GLUE test splits have label -1: nothing to learn or score.
        examples = [ex for ex in examples if task.label_index(ex) != -1]
        if not examples:
            raise ValueError(f"{task.name}: no labelled examples (GLUE test splits have label -1)")

    def make_row(index, epoch):
        del epoch  # Supervised rows do not change between epochs.
        inputs, targets = task.format(examples[index])
        label = task.label_index(examples[index]) if task.kind == "classification" else None
        return (encode_text(tokenizer, inputs, max_input_length, eos_id),
                encode_text(tokenizer, targets, max_target_length, eos_id), label)

    return make_row, len(examples), [task.references(ex) for ex in examples]


def collate(rows: Sequence[Row | None], max_input_length: int, max_target_length: int,
            with_label: bool) -> dict[str, np.ndarray]:
    """Rows (None = padding example) -> fixed-shape int32 arrays.

    Returns dict with input_ids, attention_mask [batch, max_input_length];
    labels (targets, 0 = pad), decoder_input_ids (labels shifted right after
    decoder start 0), decoder_attention_mask [batch, max_target_length];
    label [batch] when `with_label`.
    """
    b = len(rows)
    batch = {k: np.zeros((b, max_input_length), np.int32) for k in ("input_ids", "attention_mask")}
    for k in ("labels", "decoder_input_ids", "decoder_attention_mask"):
        batch[k] = np.zeros((b, max_target_length), np.int32)
    if with_label:
        batch["label"] = np.zeros((b,), np.int32)
    for r, row in enumerate(rows):
        if row is None:
            continue
        inputs, targets, label = row
        assert len(inputs) <= max_input_length and len(targets) <= max_target_length
        batch["input_ids"][r, :len(inputs)] = inputs
        batch["attention_mask"][r, :len(inputs)] = 1
        batch["labels"][r, :len(targets)] = targets
        batch["decoder_attention_mask"][r, :len(targets)] = 1
        if with_label:
            batch["label"][r] = label
    # Teacher forcing: position t sees the target token t-1 (T5's shift_right).
    batch["decoder_input_ids"][:, 0] = DECODER_START_ID
    batch["decoder_input_ids"][:, 1:] = batch["labels"][:, :-1]
    return batch


def local_rows(global_batch_size: int, process_index: int, process_count: int) -> range:
    """This process's rows of a global batch: the `process_index`-th equal block."""
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by "
                         f"process_count {process_count}")
    local = global_batch_size // process_count
    return range(process_index * local, (process_index + 1) * local)


def eval_split(spec: str, task: Task, split: str | None) -> str | None:
    """The split evaluation reads: `split`, else the spec's, else the task's."""
    return task.eval_split if split is None and parse_source(spec)[2] is None else split
