"""The streaming pipeline: indexed corpora, bad input, per-process rows, flat memory."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from test_data import _private_index_cache, tok  # noqa: F401 (shared fixtures)
from variator_jax import corpus, pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _docs(n, words=12):
    return [f"doc{i} " + " ".join(f"w{i}.{j}" for j in range(words)) for i in range(n)]


# ================================ the index ==================================


def test_the_index_splits_documents_as_blank_lines_do(tmp_path, monkeypatch):
    """Against `re.split` on blank lines (what `read_source` did in memory), on random
    layouts of blank, whitespace-only and non-ASCII lines, with blocks of 7 bytes so that
    documents and lines straddle the blocks the index scans."""
    import random
    monkeypatch.setattr(corpus, "_BLOCK", 7)
    rng = random.Random(0)
    pieces = ["a", "bc d", "", " ", "\t", "é", "x y", "\r", "  z "]
    for trial in range(200):
        text = "\n".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        text += "\n" * rng.randint(0, 2)
        path = tmp_path / f"c{trial}.txt"
        path.write_text(text, encoding="utf-8", newline="")
        want = [d.strip() for d in re.split(r"\n[ \t\r\f\v]*\n", text) if d.strip()]
        docs = corpus.open_files(str(path), "text", index_dir=str(tmp_path))
        assert [docs[i]["text"] for i in range(len(docs))] == want, repr(text)


# ================================= bad input =================================


def _first_error(it, steps=50):
    with pytest.raises(ValueError) as err:
        for _ in range(steps):
            next(it)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_a_malformed_jsonl_line_names_its_file_and_line(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": d}) for d in _docs(6)]
    lines[3] = '{"text": "unterminated'
    path.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")
    # Opening reads nothing but the index; the error comes with the record.
    it = pipeline.train_batches(f"jsonl:{path}", "pretrain", tok, global_batch_size=2,
                            max_input_length=32, max_target_length=8, seed=0,
                            index_dir=str(tmp_path))
    assert _first_error(it).startswith(f"{path}:5: invalid JSON")  # Line 5: a blank line above.


def test_a_pretraining_record_without_text_names_its_file_and_line(tmp_path, tok):
    path = tmp_path / "corpus.jsonl"
    rows = [{"text": d} for d in _docs(6)]
    rows[4] = {"body": "no text field"}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    it = pipeline.train_batches(f"jsonl:{path}", "pretrain", tok, global_batch_size=2,
                            max_input_length=32, max_target_length=8, seed=0, prefetch=0)
    message = _first_error(it)
    assert message.startswith(f"{path}:5: pretrain example lacks field 'text'"), message


def test_an_undecodable_byte_names_its_file_and_offset(tmp_path):
    raw = "\n\n".join(_docs(3)).encode() + b"\n\nbad \xff byte\n\n" + b"last doc\n"
    path = tmp_path / "bad.txt"
    path.write_bytes(raw)
    docs = corpus.open_files(str(path), "text", index_dir=str(tmp_path))
    assert len(docs) == 5 and docs[4] == {"text": "last doc"}
    offset = raw.index(b"\xff")
    with pytest.raises(corpus.CorpusError, match=f"{path}: byte {offset} is not UTF-8"):
        docs[3]


def test_an_empty_glob_names_the_pattern(tmp_path, tok):
    pattern = f"{tmp_path}/wiki/*.txt"
    with pytest.raises(FileNotFoundError, match=re.escape(f"the pattern {pattern} matches no")):
        pipeline.train_batches(f"text:{pattern}", "pretrain", tok, global_batch_size=2,
                           max_input_length=32, max_target_length=8, seed=0)


def test_a_changed_or_shrunk_corpus_is_reindexed(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(_docs(8)))
    assert len(corpus.open_files(str(path), "text", index_dir=str(tmp_path))) == 8
    path.write_text("\n\n".join(_docs(3)))  # Shrunk: stale offsets would read garbage.
    docs = corpus.open_files(str(path), "text", index_dir=str(tmp_path))
    assert len(docs) == 3 and docs[2] == {"text": _docs(3)[2]}


def test_a_document_longer_than_the_record_limit_is_cut_at_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "MAX_RECORD_BYTES", 64)
    lines = [f"line {i} " + "x" * 20 for i in range(10)] + ["é" * 80]
    path = tmp_path / "long.txt"
    path.write_text("\n".join(lines) + "\n\nshort\n")
    docs = corpus.open_files(str(path), "text", index_dir=str(tmp_path))
    texts = [docs[i]["text"] for i in range(len(docs))]
    assert texts[-1] == "short" and len(texts) > 3
    assert all(len(t.encode()) <= 64 for t in texts)
    assert "".join(texts[:-1]).replace("\n", "") == "".join(lines)  # Nothing lost.


# ============================ per-process rows ===============================


class _Recorder(list):
    """An in-memory source that notes which records were read."""
    def __init__(self, docs):
        super().__init__({"text": d} for d in docs)
        self.read = set()

    def __getitem__(self, i):
        self.read.add(int(i))
        return super().__getitem__(i)


def test_processes_read_disjoint_documents_and_resume_their_rows(tmp_path, tok, monkeypatch):
    docs = _docs(64)
    sources = []

    def fake_open_source(*args, **kwargs):
        sources.append(_Recorder(docs))
        return sources[-1]

    monkeypatch.setattr(pipeline, "open_source", fake_open_source)
    kw = dict(global_batch_size=8, max_input_length=48, max_target_length=12, seed=1,
              prefetch=0)  # (No read-ahead, so that `read` is exactly what was taken.)
    single = pipeline.train_batches("text:x", "pretrain", tok, **kw)
    halves = [pipeline.train_batches("text:x", "pretrain", tok, process_index=i, process_count=2,
                                 **kw) for i in range(2)]
    for _ in range(3):  # Less than an epoch: every document is read at most once.
        want = next(single)
        local = [next(h) for h in halves]
        for k in want:
            np.testing.assert_array_equal(np.concatenate([b[k] for b in local]), want[k])
    whole, p0, p1 = (s.read for s in sources)
    assert p0 and p1 and not p0 & p1 and p0 | p1 == whole
    # Mid-epoch: the two processes' states, merged as a checkpoint holds them, resume both
    # halves and a single process exactly where the unbroken stream goes on.
    state = single.get_state()
    merged = dict(state, grain={"rows": {**halves[0].get_state()["grain"]["rows"],
                                         **halves[1].get_state()["grain"]["rows"]}})
    assert merged == json.loads(json.dumps(state))
    resumed = pipeline.train_batches("text:x", "pretrain", tok, state=merged, **kw)
    want = next(single)
    np.testing.assert_array_equal(next(resumed)["input_ids"], want["input_ids"])
    half = pipeline.train_batches("text:x", "pretrain", tok, state=merged, process_index=1,
                              process_count=2, **kw)
    np.testing.assert_array_equal(next(half)["labels"], want["labels"][4:])


# ================================ flat memory ================================

_MEMORY_SCRIPT = r"""
import os, sys, time, psutil
import numpy as np
from variator_jax import data, pipeline
path, index_dir = sys.argv[1], sys.argv[2]
proc = psutil.Process()
it = pipeline.train_batches(f"text:{path}", "pretrain", data.load_tokenizer("byte"),
                        global_batch_size=8, max_input_length=224, max_target_length=32,
                        seed=0, index_dir=index_dir)
next(it)
base = proc.memory_info().rss
for _ in range(200):
    next(it)
print(base, proc.memory_info().rss, os.path.getsize(path))
"""


def test_memory_stays_flat_while_streaming_a_corpus(tmp_path):
    """A 48 MB corpus: after the first batch, 200 more (about 0.3 MB of text) add next to no
    memory, and the process never holds the corpus (its RSS stays far below the file)."""
    rng = np.random.default_rng(0)
    words = np.array(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"])
    path = tmp_path / "big.txt"
    block = "\n\n".join(" ".join(rng.choice(words, 150)) for _ in range(1000)) + "\n\n"
    with open(path, "w") as f:
        for _ in range(48):
            f.write(block)
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(path), str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    base, end, size = map(int, out.stdout.split())
    assert size > 40e6
    assert end - base < 8e6, (base, end)


# ================================== workers ==================================


def test_worker_processes_give_the_same_batches_and_resume(tok):
    """Two grain worker processes (each builds every other row) against none."""
    kw = dict(global_batch_size=4, max_input_length=48, max_target_length=12, seed=2,
              split="train[:10%]")
    want = pipeline.train_batches("builtin:pydoc", "pretrain", tok, **kw)
    want = [next(want) for _ in range(3)]
    it = pipeline.train_batches("builtin:pydoc", "pretrain", tok, workers=2, **kw)
    for w in want[:2]:
        np.testing.assert_array_equal(next(it)["input_ids"], w["input_ids"])
    state = json.loads(json.dumps(it.get_state()))
    resumed = pipeline.train_batches("builtin:pydoc", "pretrain", tok, workers=2, state=state, **kw)
    np.testing.assert_array_equal(next(resumed)["labels"], want[2]["labels"])
    with pytest.raises(ValueError, match="data state mismatch: workers"):
        pipeline.train_batches("builtin:pydoc", "pretrain", tok, workers=3, state=state, **kw)
