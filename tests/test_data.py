"""Tests for variator_jax.data: sources, tasks, span corruption, batching."""
import json

import numpy as np
import pytest

from variator_jax import data, pipeline

EOS = 1
SENTINELS = np.arange(259, 384, dtype=np.int32)  # ByT5's <extra_id_0> .. <extra_id_124>.
GLUE = ("mnli", "qqp", "qnli", "sst2", "rte", "mrpc")


@pytest.fixture(scope="module")
def tok():
    return data.load_tokenizer("byte")


@pytest.fixture(autouse=True)
def _private_index_cache(tmp_path_factory, monkeypatch):
    """File indices go to a temporary cache, not the user's (corpus.py's default)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))


def _byte_ids(text):
    """ByT5's encoding, restated: UTF-8 byte b -> id b + 3 (pad, eos, unk come first)."""
    return [b + 3 for b in text.encode("utf-8")]


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def _write_jsonl(path, rows):
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


def _concat(batches):
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ============================ span corruption =================================


def _uncorrupt(inputs, targets, sentinels=SENTINELS):
    """Independent inverse of span corruption: put each target span back in place
    of its sentinel. Also checks sentinels come in order <extra_id_0>, 1, ..."""
    assert inputs[-1] == EOS and targets[-1] == EOS
    inputs, targets = list(inputs[:-1]), list(targets[:-1])
    sentinels = np.asarray(sentinels)
    is_sentinel = set(sentinels.tolist())
    spans, order = {}, []
    for t in targets:
        if t in is_sentinel:
            order.append(t)
            spans[t] = []
        else:
            spans[order[-1]].append(t)  # Targets must open with a sentinel.
    assert order == sentinels[:len(order)].tolist()
    assert [t for t in inputs if t in is_sentinel] == order
    assert all(spans[s] for s in order), "every noise span is non-empty"
    out = []
    for t in inputs:
        out.extend(spans[t] if t in is_sentinel else [t])
    return out, spans


def _expected_counts(n):
    """T5's counts for n >= 2 tokens, computed in float32 as tf.round does."""
    noise = int(round(float(np.float32(n) * np.float32(0.15))))
    noise = min(max(noise, 1), n - 1)
    return noise, max(int(round(float(np.float32(noise) / np.float32(3.0)))), 1)


@pytest.mark.parametrize("n", [2, 3, 7, 20, 57, 156, 190, 401])
def test_span_corruption_reconstructs_and_counts(n):
    for seed in range(5):
        tokens = np.random.default_rng(seed).integers(3, 259, size=n)
        inputs, targets = data.span_corruption(tokens, np.random.default_rng(seed), 0.15, 3.0,
                                               SENTINELS, EOS)
        assert inputs.dtype == np.int32 and targets.dtype == np.int32
        restored, spans = _uncorrupt(inputs, targets)
        assert restored == tokens.tolist()
        noise, num_spans = _expected_counts(n)
        assert len(spans) == num_spans
        assert sum(len(s) for s in spans.values()) == noise
        assert (len(inputs), len(targets)) == data.span_corruption_lengths(n)


def test_noise_counts_follow_tf_float32_rounding():
    # 190 * 0.15 is 28.4999... in float64 but 28.500002 in float32: t5's TF mask
    # picks 29 noise tokens, 10 spans.
    assert data.span_corruption_lengths(190) == (190 - 29 + 10 + 1, 29 + 10 + 1)
    mask = data.random_spans_noise_mask(1000, np.random.default_rng(0))
    assert mask.sum() == 150
    starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
    assert len(starts) == 50  # round(150 / 3) spans, so mean span length 3.
    assert not mask[0] and mask[-1]  # t5: non-noise first, ends on noise.


def test_single_span_mask_is_the_tail():
    # 20 tokens -> 3 noise tokens in 1 span: t5 (random_roll=False) always
    # masks the last 3 positions; any re-randomisation would change this.
    for seed in range(10):
        mask = data.random_spans_noise_mask(20, np.random.default_rng(seed))
        np.testing.assert_array_equal(mask, np.arange(20) >= 17)


def test_span_corruption_depends_only_on_rng():
    tokens = np.arange(3, 203)

    def run(seed):
        return data.span_corruption(tokens, np.random.default_rng(seed), 0.15, 3.0, SENTINELS, EOS)

    a, b, c = run(7), run(7), run(8)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])


def test_tokens_length_helper_fits_exactly():
    # t5's random_spans_helper(inputs_length=512, 0.15, 3.0, 1, 1) = (568, 114).
    assert data.random_spans_tokens_length(512, 10_000) == 568
    assert data.span_corruption_lengths(568) == (512, 114)
    # Variator's pre-training lengths: the targets bind first.
    assert data.random_spans_tokens_length(224, 32) == 156
    assert data.span_corruption_lengths(156) == (142, 32)
    for max_in, max_tgt in [(8, 8), (32, 8), (64, 64), (100, 12), (512, 114)]:
        n = data.random_spans_tokens_length(max_in, max_tgt)
        n_in, n_tgt = data.span_corruption_lengths(n)
        assert n_in <= max_in and n_tgt <= max_tgt
        n_in1, n_tgt1 = data.span_corruption_lengths(n + 1)
        assert n_in1 > max_in or n_tgt1 > max_tgt
        inputs, targets = data.span_corruption(np.arange(3, 3 + n), np.random.default_rng(0),
                                               0.15, 3.0, SENTINELS, EOS)
        assert (len(inputs), len(targets)) == (n_in, n_tgt)
    with pytest.raises(ValueError, match="too short"):
        data.random_spans_tokens_length(2, 2)


def _row_chunks(token_lists, global_batch_size, seed, n, count):
    """Independent restatement of the pretrain rows: documents are visited in grain's seeded
    order (re-shuffled each epoch); row r concatenates the documents at positions r, r + G,
    ... (t5's reduce_concat_tokens) and splits every n tokens (split_tokens)."""
    import grain
    order = grain.MapDataset.source(range(len(token_lists))).shuffle(
        seed=pipeline._shuffle_seed(seed)).repeat()
    rows = []
    for r in range(global_batch_size):
        stream, p = [], r
        while len(stream) < n * count:
            stream += list(token_lists[order[p]])
            p += global_batch_size
        rows.append([stream[i:i + n] for i in range(0, n * count, n)])
    return rows


def _restore(b, row):
    inputs = b["input_ids"][row][b["attention_mask"][row] == 1]
    targets = b["labels"][row][b["decoder_attention_mask"][row] == 1]
    return list(_uncorrupt(inputs, targets)[0]), inputs, targets


@pytest.mark.parametrize("noise,max_target_length", [((0.15, 3.0), 16), ((0.5, 8.0), 64)])
def test_pretrain_rows_are_corrupted_t5_chunks_of_their_documents(tmp_path, tok, noise,
                                                                   max_target_length):
    # Unique words, so that no two chunks are equal.
    docs = [f"Document {i}: " + " ".join(f"w{i}.{j}" for j in range(20 + 9 * i)) for i in range(12)]
    path = _write(tmp_path / "c.txt", "\n\n".join(docs) + "\n")
    kw = {} if noise == (0.15, 3.0) else {"noise": noise}  # T5's by default.
    it = pipeline.train_batches(f"text:{path}", "pretrain", tok, global_batch_size=4,
                            max_input_length=64, max_target_length=max_target_length, seed=3,
                            index_dir=str(tmp_path), **kw)
    n = data.random_spans_tokens_length(64, max_target_length, *noise)
    want = _row_chunks([_byte_ids(d) for d in docs], 4, 3, n, 12)
    for k in range(12):  # Several epochs of documents.
        batch = next(it)
        for r in range(4):
            restored, inputs, targets = _restore(batch, r)
            assert restored == want[r][k], (k, r)
            # Chunk k of row r is corrupted by its own generator: the same for any workers,
            # process count or resume point.
            rng = np.random.default_rng([3, 1, r, k])
            w_in, w_tgt = data.span_corruption(np.asarray(want[r][k]), rng, *noise,
                                               SENTINELS, EOS)
            np.testing.assert_array_equal(inputs, w_in)
            np.testing.assert_array_equal(targets, w_tgt)


def test_streamed_files_equal_the_in_memory_corpus(tmp_path, tok):
    """The same documents as one text file, two gzip shards behind a glob, a JSONL file,
    and an in-memory list (builtin-style) give the same batches."""
    import gzip
    docs = [f"Doc {i} é " + " ".join(f"t{i}.{j}" for j in range(5 + 3 * i)) for i in range(9)]
    text = "\n\n".join(docs) + "\n"
    _write(tmp_path / "one.txt", text)
    for name, part in (("a", docs[:4]), ("b", docs[4:])):
        with gzip.open(tmp_path / f"shard-{name}.txt.gz", "wt", encoding="utf-8") as f:
            f.write("\n \n".join(part))
    _write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    kw = dict(global_batch_size=4, max_input_length=48, max_target_length=12, seed=7,
              index_dir=str(tmp_path / "index"))
    specs = [f"text:{tmp_path}/one.txt", f"text:{tmp_path}/shard-*.txt.gz",
             f"jsonl:{tmp_path}/d.jsonl"]
    streams = [pipeline.train_batches(spec, "pretrain", tok, **kw) for spec in specs]
    assert pipeline.open_source(specs[1], index_dir=kw["index_dir"])[5] == {"text": docs[5]}
    original = pipeline.open_source
    pipeline.open_source = lambda *a, **k: [{"text": d} for d in docs]
    try:
        in_memory = pipeline.train_batches("builtin:pydoc", "pretrain", tok, **kw)
    finally:
        pipeline.open_source = original
    for _ in range(6):
        want = next(in_memory)
        for it in streams:
            _assert_batches_equal(next(it), want)


def test_pretrain_with_a_subword_tokenizer_from_a_path(tmp_path):
    # A tiny T5-style (Unigram + Metaspace) tokenizer with 3 sentinels, saved
    # and loaded like a real checkpoint's: no byte-level shortcuts anywhere.
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    docs = [f"Paragraph {i} talks about item {i} and its neighbour {i + 1}." for i in range(40)]
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer, unigram.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    unigram.train_from_iterator(docs, trainers.UnigramTrainer(
        vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    transformers.T5TokenizerFast(tokenizer_object=unigram, extra_ids=3, eos_token="</s>",
                                 pad_token="<pad>", unk_token="<unk>").save_pretrained(
                                     str(tmp_path / "tok"))
    tok = data.load_tokenizer(str(tmp_path / "tok"))
    sentinels = [tok.convert_tokens_to_ids(f"<extra_id_{i}>") for i in range(3)]
    spec = f"text:{_write(tmp_path / 'c.txt', (chr(10) * 2).join(docs))}"
    batch = next(pipeline.train_batches(spec, "pretrain", tok, global_batch_size=2,
                                    max_input_length=64, max_target_length=12, seed=0))
    n = data.random_spans_tokens_length(64, 12)
    want = _row_chunks(tok(docs, add_special_tokens=False)["input_ids"], 2, 0, n, 1)
    for row in range(2):
        inputs = batch["input_ids"][row][batch["attention_mask"][row] == 1]
        targets = batch["labels"][row][batch["decoder_attention_mask"][row] == 1]
        assert _uncorrupt(inputs, targets, sentinels)[0] == want[row][0]
    # 96 / 16 -> 76-token chunks in 4 spans: one sentinel more than there are.
    with pytest.raises(ValueError, match="no <extra_id_3> token"):
        pipeline.train_batches(spec, "pretrain", tok, global_batch_size=2,
                           max_input_length=96, max_target_length=16, seed=0)


# ================================== tasks =====================================


@pytest.mark.parametrize("name, example, inputs, targets", [
    ("mnli", {"premise": "P.", "hypothesis": "H.", "label": 2, "idx": 0},
     "mnli hypothesis: H. premise: P.", "contradiction"),
    ("qqp", {"question1": "A?", "question2": "B?", "label": 1},
     "qqp question1: A? question2: B?", "duplicate"),
    ("qnli", {"question": "Q?", "sentence": "S.", "label": 1},
     "qnli question: Q? sentence: S.", "not_entailment"),
    ("sst2", {"sentence": "a gem", "label": 1}, "sst2 sentence: a gem", "positive"),
    ("rte", {"sentence1": "A.", "sentence2": "B.", "label": 0},
     "rte sentence1: A. sentence2: B.", "entailment"),
    ("mrpc", {"sentence1": "A.", "sentence2": "B.", "label": 0},
     "mrpc sentence1: A. sentence2: B.", "not_equivalent"),
    ("squad", {"question": "Who?", "context": "Ann ran.",
               "answers": {"text": ["Ann", "Ann ran"], "answer_start": [0, 0]}},
     "question: Who? context: Ann ran.", "Ann"),
    ("sst2", {"inputs": "free text", "targets": "negative"}, "free text", "negative"),
])
def test_task_format(name, example, inputs, targets):
    assert data.get_task(name).format(example) == (inputs, targets)


def test_task_labels_and_references():
    sst2, squad = data.get_task("sst2"), data.get_task("squad")
    assert sst2.label_index({"sentence": "x", "label": "negative"}) == 0
    assert sst2.label_index({"inputs": "x", "targets": "positive"}) == 1
    assert sst2.references({"sentence": "x", "label": 1}) == ["positive"]
    assert squad.labels is None
    assert squad.references({"answers": {"text": ["a", "b"]}}) == ["a", "b"]
    assert data.get_task("mnli").eval_split == "validation_matched"
    with pytest.raises(ValueError, match="unknown label 'meh'"):
        sst2.label_index({"sentence": "x", "label": "meh"})
    with pytest.raises(ValueError, match="lacks field 'sentence2'"):
        data.get_task("rte").format({"sentence1": "x", "label": 0})


def test_verbalizer_ids_are_distinct_first_bytes(tok):
    ids = data.get_task("mnli").verbalizer_ids(tok)
    assert ids.tolist() == [ord("e") + 3, ord("n") + 3, ord("c") + 3]
    for name in GLUE:
        task = data.get_task(name)
        ids = task.verbalizer_ids(tok)
        assert len(set(ids.tolist())) == len(task.labels)
        assert ids.tolist() == [_byte_ids(label)[0] for label in task.labels]
    with pytest.raises(ValueError, match="'yes' and 'yeah' share their first token"):
        data.Task("yn", "classification", ["yes", "yeah"]).verbalizer_ids(tok)
    with pytest.raises(ValueError, match="squad has no labels"):
        data.get_task("squad").verbalizer_ids(tok)


# ========================= sources and tokenizers =============================


def test_builtin_pydoc_and_slices():
    from pydoc_data.topics import topics
    docs = data.read_source("builtin:pydoc")
    assert docs[0]["text"] == topics[sorted(topics)[0]].strip()
    assert len(docs) == sum(1 for v in topics.values() if v.strip())
    assert data.read_source("builtin:pydoc", split="train[:10]") == docs[:10]
    assert data.read_source("builtin:pydoc", split="train[90%:]") == \
        docs[round(len(docs) * 0.9):]
    assert data.read_source("builtin:pydoc", split="all[-3:]+train[:2]") == docs[-3:] + docs[:2]
    # A split the source does not have is an error, never the whole corpus.
    with pytest.raises(ValueError, match="builtin:pydoc has no split 'validation'; its splits: "
                                         "train"):
        data.read_source("builtin:pydoc", split="validation[90%:]")


def test_text_and_jsonl_sources(tmp_path):
    path = _write(tmp_path / "t.txt", "first doc\nline two\n\n  \n\nsecond\n\n\n")
    assert data.read_source(f"text:{path}") == [{"text": "first doc\nline two"},
                                                 {"text": "second"}]
    rows = [{"sentence": "s", "label": 1}, {"sentence": "t", "label": 0}]
    path = _write(tmp_path / "j.jsonl", json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    assert data.read_source(f"jsonl:{path}", "all") == rows


def test_source_errors(tmp_path):
    known = "known schemes: text, jsonl, tfds, builtin"
    with pytest.raises(ValueError, match=f"unknown data source scheme 'csv'.*{known}"):
        data.read_source("csv:/x.csv")
    with pytest.raises(ValueError, match="has no scheme"):
        data.read_source("/just/a/path.txt")
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match=f"no such file: {missing}"):
        data.read_source(f"text:{missing}")
    with pytest.raises(ValueError, match="empty corpus"):
        data.read_source(f"text:{_write(tmp_path / 'e.txt', chr(10) * 3)}")
    with pytest.raises(ValueError, match="empty corpus"):
        data.read_source(f"jsonl:{_write(tmp_path / 'e.jsonl', '')}")
    with pytest.raises(ValueError, match=r"b.jsonl:2: invalid JSON"):
        data.read_source(f"jsonl:{_write(tmp_path / 'b.jsonl', '{}' + chr(10) + '{oops')}")
    with pytest.raises(ValueError,
                       match="unknown builtin corpus 'wiki'; known: pydoc, stdlib_docs"):
        data.read_source("builtin:wiki")
    with pytest.raises(ValueError, match="bad split"):
        data.read_source("builtin:pydoc", split="train[a:b]")
    with pytest.raises(ValueError, match="unknown task 'cola'; known tasks: pretrain, mnli"):
        data.get_task("cola")


def test_load_tokenizer(tmp_path, tok):
    assert (tok.eos_token_id, tok.pad_token_id) == (1, 0)
    assert tok.convert_tokens_to_ids("<extra_id_0>") == 259
    with pytest.raises(ValueError, match="no tokenizer"):
        data.load_tokenizer(None)
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        data.load_tokenizer(None, backbone_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tokenizer path not found"):
        data.load_tokenizer(str(tmp_path / "missing"))
    tok.save_pretrained(str(tmp_path / "bb"))
    for loaded in (data.load_tokenizer(str(tmp_path / "bb")),
                   data.load_tokenizer(None, backbone_dir=str(tmp_path / "bb"))):
        assert loaded.encode("héllo", add_special_tokens=False) == _byte_ids("héllo")


# ================================== batches ===================================


def _sst2_rows(n):
    return [{"sentence": f"sentence number {i}", "label": i % 2, "idx": i} for i in range(n)]


def test_batch_layout_and_truncation(tmp_path, tok):
    rows = [{"sentence": "x" * 100, "label": 1}, {"sentence": "ok", "label": 0}]
    path = _write_jsonl(tmp_path / "s.jsonl", rows)
    it = pipeline.eval_batches(f"jsonl:{path}", "sst2", tok, global_batch_size=2,
                           max_input_length=32, max_target_length=8, split="all")
    (b,) = list(it)
    assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
        "input_ids": ((2, 32), "int32"), "attention_mask": ((2, 32), "int32"),
        "labels": ((2, 8), "int32"), "decoder_input_ids": ((2, 8), "int32"),
        "decoder_attention_mask": ((2, 8), "int32"), "label": ((2,), "int32"),
        "weight": ((2,), "float32"), "index": ((2,), "int32")}
    # Truncated to 32 with EOS kept last; the short one padded with zeros.
    assert b["input_ids"][0].tolist() == _byte_ids("sst2 sentence: " + "x" * 100)[:31] + [EOS]
    short = _byte_ids("sst2 sentence: ok") + [EOS]
    assert b["input_ids"][1].tolist() == short + [0] * (32 - len(short))
    np.testing.assert_array_equal(b["attention_mask"], b["input_ids"] != 0)
    positive = _byte_ids("positive")[:7] + [EOS]
    assert b["labels"][0].tolist() == positive
    assert b["decoder_input_ids"][0].tolist() == [0] + positive[:-1]
    np.testing.assert_array_equal(b["decoder_attention_mask"], b["labels"] != 0)
    assert b["label"].tolist() == [1, 0]
    assert it.references == [["positive"], ["negative"]]


def test_unlabelled_examples_are_dropped(tmp_path, tok):
    rows = [{"sentence": "a", "label": -1}, {"sentence": "b", "label": 1},
            {"sentence": "c", "label": -1}]
    it = pipeline.eval_batches(f"jsonl:{_write_jsonl(tmp_path / 'm.jsonl', rows)}", "sst2", tok,
                           global_batch_size=4, max_input_length=16, max_target_length=4,
                           split="all")
    assert it.num_examples == 1 and it.references == [["positive"]]
    path = _write_jsonl(tmp_path / "t.jsonl", [rows[0]])
    with pytest.raises(ValueError, match="no labelled examples"):
        pipeline.train_batches(f"jsonl:{path}", "sst2", tok, global_batch_size=2,
                           max_input_length=16, max_target_length=4, seed=0, split="all")


def test_unlabelled_examples_train_a_loss_that_needs_no_label(tmp_path, tok):
    rows = [{"sentence": "a", "label": -1}, {"sentence": "b", "label": 1},
            {"sentence": "c", "label": -1}]
    path = _write_jsonl(tmp_path / "m.jsonl", rows)
    kw = dict(global_batch_size=3, max_input_length=32, max_target_length=4, seed=0, prefetch=0,
              split="all")
    it = pipeline.train_batches(f"jsonl:{path}", "sst2", tok, unlabelled=True, **kw)
    assert it.checks["num_examples"] == 3 and it.checks["unlabelled"] == 2
    b = next(it)  # One epoch, shuffled: the rows by their input's first byte.
    first = {chr(ids[len("sst2 sentence: ")] - 3): r for r, ids in enumerate(b["input_ids"])}
    for name, label in (("a", -1), ("b", 1), ("c", -1)):
        r = first[name]
        assert b["label"][r] == label
        # Unlabelled: the target is EOS alone, so the decoder reads the start token only.
        want = [EOS, 0, 0, 0] if label == -1 else _byte_ids("positive")[:3] + [EOS]
        assert b["labels"][r].tolist() == want
        assert b["decoder_attention_mask"][r].tolist() == [int(t != 0) for t in want]
    dropped = pipeline.train_batches(f"jsonl:{path}", "sst2", tok, **kw)
    assert dropped.checks["num_examples"] == 1 and "unlabelled" not in dropped.checks


def test_epochs_cover_every_example_once(tmp_path, tok):
    path = _write_jsonl(tmp_path / "s.jsonl", _sst2_rows(12))

    def epoch_order(seed):
        it = pipeline.train_batches(f"jsonl:{path}", "sst2", tok, global_batch_size=4,
                                max_input_length=48, max_target_length=4, seed=seed, split="all")
        return [tok.decode(ids, skip_special_tokens=True)
                for _ in range(6) for ids in next(it)["input_ids"]]

    order = epoch_order(0)
    expected = sorted(f"sst2 sentence: sentence number {i}" for i in range(12))
    assert sorted(order[:12]) == expected and sorted(order[12:]) == expected
    assert order[:12] != order[12:]  # Reshuffled per epoch,
    assert order == epoch_order(0) and order != epoch_order(1)  # from the seed.


@pytest.mark.parametrize("task, spec_rows", [("pretrain", None), ("sst2", 10)])
def test_processes_slice_the_global_batch(tmp_path, tok, task, spec_rows):
    if spec_rows is None:
        text = "\n\n".join(f"doc {i} " + "words and more words " * 4 for i in range(6))
        spec = f"text:{_write(tmp_path / 'c.txt', text)}"
    else:
        spec = f"jsonl:{_write_jsonl(tmp_path / 's.jsonl', _sst2_rows(spec_rows))}"
    kw = dict(global_batch_size=8, max_input_length=48, max_target_length=12)
    single = pipeline.train_batches(spec, task, tok, seed=5, **kw)
    multi = {p: [pipeline.train_batches(spec, task, tok, seed=5, process_index=i, process_count=p,
                                    **kw) for i in range(p)] for p in (2, 4)}
    for _ in range(4):  # A few batches: crosses an epoch boundary.
        want = next(single)
        for p, its in multi.items():
            local = [next(it) for it in its]
            assert local[0]["input_ids"].shape == (8 // p, 48)
            _assert_batches_equal(_concat(local), want)
    single_eval = list(pipeline.eval_batches(spec, task, tok, **kw))
    for i, batch in enumerate(single_eval):
        local = [list(pipeline.eval_batches(spec, task, tok, process_index=j, process_count=2,
                                        **kw))[i] for j in range(2)]
        _assert_batches_equal(_concat(local), batch)
    with pytest.raises(ValueError, match="not divisible by process_count 3"):
        pipeline.train_batches(spec, task, tok, seed=5, process_count=3, **kw)


def test_resume_from_state_gives_the_same_batches(tmp_path, tok):
    for task, path in [("sst2", _write_jsonl(tmp_path / "s.jsonl", _sst2_rows(10))),
                       ("pretrain", _write(tmp_path / "c.txt", "some text here. " * 40))]:
        spec = "jsonl:" + path if task == "sst2" else "text:" + path
        kw = dict(global_batch_size=4, max_input_length=32, max_target_length=8, seed=11)
        unbroken = pipeline.train_batches(spec, task, tok, **kw)
        batches = [next(unbroken) for _ in range(7)]
        it = pipeline.train_batches(spec, task, tok, **kw)
        next(it), next(it), next(it)
        state = json.loads(json.dumps(it.get_state()))
        assert state["batch_index"] == 3
        resumed = pipeline.train_batches(spec, task, tok, state=state, **kw)
        for want in batches[3:]:
            _assert_batches_equal(next(resumed), want)
        # Different process count, same global stream from the same state.
        halves = [pipeline.train_batches(spec, task, tok, state=state, process_index=i,
                                     process_count=2, **kw) for i in range(2)]
        _assert_batches_equal(_concat([next(h) for h in halves]), batches[3])
    with pytest.raises(ValueError, match="data state mismatch: seed"):
        pipeline.train_batches(spec, task, tok, state={**state, "seed": 12}, **kw)
    with pytest.raises(ValueError, match=r"data state mismatch: noise is \[0.5, 8.0\]"):
        pipeline.train_batches(spec, task, tok, state=state, noise=(0.5, 8.0), **kw)
    with pytest.raises(ValueError, match="0 < noise_density < 1"):
        pipeline.train_batches(spec, task, tok, noise=(1.0, 3.0), **kw)


def test_eval_pads_last_batch_with_zero_weight(tmp_path, tok):
    spec = f"jsonl:{_write_jsonl(tmp_path / 's.jsonl', _sst2_rows(10))}"
    kw = dict(global_batch_size=4, max_input_length=48, max_target_length=4, split="all")
    it = pipeline.eval_batches(spec, "sst2", tok, **kw)
    batches = list(it)
    assert len(batches) == len(it) == 3
    assert np.concatenate([b["weight"] for b in batches]).tolist() == [1.0] * 10 + [0.0] * 2
    assert np.concatenate([b["index"] for b in batches]).tolist() == list(range(10)) + [-1, -1]
    assert not batches[-1]["input_ids"][2:].any() and not batches[-1]["labels"][2:].any()
    assert tok.decode(batches[0]["input_ids"][1], skip_special_tokens=True) == \
        "sst2 sentence: sentence number 1"  # In order, no shuffling.
    local = list(pipeline.eval_batches(spec, "sst2", tok, process_index=1, process_count=2, **kw))
    assert local[-1]["weight"].tolist() == [0.0, 0.0] and local[0]["index"].tolist() == [2, 3]
    _assert_batches_equal(batches[0], list(it)[0])  # Re-iterable.


# =========================== tfds (mocked data) ===============================


@pytest.fixture(scope="module")
def tfds():
    tf = pytest.importorskip("tensorflow")
    tf.config.set_visible_devices([], "GPU")  # JAX owns the accelerator.
    return pytest.importorskip("tensorflow_datasets")


def test_tasks_match_installed_tfds_features(tfds, tmp_path):
    for name in GLUE:
        info = tfds.builder(f"glue/{name}", data_dir=str(tmp_path)).info
        task = data.get_task(name)
        assert info.features["label"].names == task.labels
        assert tuple(sorted(set(info.features) - {"idx", "label"})) == task.features
    squad = tfds.builder("squad/v1.1", data_dir=str(tmp_path)).info.features
    assert {"question", "context"} <= set(squad) and "text" in squad["answers"].feature


def test_tfds_errors(tfds, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"sst2 is not prepared in data_dir={tmp_path}"):
        data.read_source("tfds:glue/sst2", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown tfds dataset 'no_such_set'"):
        data.read_source("tfds:no_such_set:train", data_dir=str(tmp_path))


def test_tfds_glue_sst2(tfds, tmp_path, tok):
    with tfds.testing.mock_data(num_examples=8):
        examples = data.read_source("tfds:glue/sst2", data_dir=str(tmp_path))
        it = pipeline.train_batches("tfds:glue/sst2:train", "sst2", tok, global_batch_size=8,
                                max_input_length=64, max_target_length=10, seed=0,
                                data_dir=str(tmp_path))
    assert all(isinstance(e["sentence"], str) and e["label"] in (0, 1) for e in examples)
    b = next(it)
    got = sorted((tok.decode(ids, skip_special_tokens=True), int(label))
                 for ids, label in zip(b["input_ids"], b["label"], strict=True))
    want = sorted(("sst2 sentence: " + e["sentence"], e["label"]) for e in examples)
    assert got == want
    labels = [tok.decode(ids, skip_special_tokens=True) for ids in b["labels"]]
    assert labels == [["negative", "positive"][i] for i in b["label"]]


def test_tfds_squad_eval_keeps_all_answers(tfds, tmp_path, tok):
    with tfds.testing.mock_data(num_examples=5):
        examples = data.read_source("tfds:squad/v1.1", split="validation")
        it = pipeline.eval_batches("tfds:squad/v1.1", "squad", tok, global_batch_size=4,
                               max_input_length=256, max_target_length=64)
    answers = [e["answers"]["text"] for e in examples]
    assert it.references == answers
    batches = list(it)
    assert [w for b in batches for w in b["weight"].tolist()] == [1.0] * 5 + [0.0] * 3
    first = [tok.decode(ids, skip_special_tokens=True) for b in batches for ids in b["labels"]]
    assert first[:5] == [a[0][:63] if a else "" for a in answers]
    assert tok.decode(batches[0]["input_ids"][0], skip_special_tokens=True) == \
        f"question: {examples[0]['question']} context: {examples[0]['context']}"[:255]
