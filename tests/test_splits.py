"""Splits of file sources (splits.py) through `data.read_source` and `pipeline.open_source`,
and typed jsonl records."""
import gzip
import json

import pytest

from test_data import _private_index_cache, tok  # noqa: F401 (shared fixtures)
from variator_jax import data, pipeline, splits


def _rows(n, prefix="doc"):
    return [{"text": f"{prefix} {i} " + "w" * (i % 7), "label": i % 3} for i in range(n)]


def _write_jsonl(path, rows, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def _both(spec, split):
    """The split's records through read_source and open_source, checked equal."""
    via_read = data.read_source(spec, split)
    source = pipeline.open_source(spec, split=split)
    assert [source[i] for i in range(len(source))] == via_read
    return via_read


def _texts(rows):
    return {r["text"] for r in rows}


def test_a_jsonl_directory_maps_files_to_splits(tmp_path):
    files = {"train": _rows(20, "tr"), "validation": _rows(5, "va"), "test": _rows(7, "te")}
    for name, rows in files.items():
        gz = name == "test"  # A split file may be gzip.
        _write_jsonl(tmp_path / f"{name}.jsonl{'.gz' if gz else ''}", rows, gz=gz)
    spec = f"jsonl:{tmp_path}"
    for name, rows in files.items():
        assert _both(spec, name) == rows
    assert _both(spec, None) == files["train"]  # The default split is train, not the whole dir.
    assert _both(spec, "train[:80%]") == files["train"][:16]
    assert _both(spec, "validation[-2:]+test[:1]") == files["validation"][-2:] + files["test"][:1]
    assert _both(spec, "all") == files["train"] + files["validation"] + files["test"]
    with pytest.raises(ValueError, match=r"has no split 'unlabeled'; its splits: train, "
                                         r"validation, test"):
        data.read_source(spec, "unlabeled")
    with pytest.raises(ValueError, match="has no split 'dev'"):
        pipeline.open_source(spec, split="dev")
    # Records name their file and line.
    source = pipeline.open_source(spec, split="test[2:]")
    assert splits.where(source, 1).endswith("test.jsonl.gz:4")


def test_a_split_field_selects_rows(tmp_path):
    rows = [dict(r, split=("train", "validation", "test", "unlabeled")[i % 4])
            for i, r in enumerate(_rows(40))]
    spec = f"jsonl:{_write_jsonl(tmp_path / 'one.jsonl', rows)}"
    got = {name: _both(spec, name) for name in ("train", "validation", "test", "unlabeled")}
    assert {name: len(r) for name, r in got.items()} == {
        "train": 10, "validation": 10, "test": 10, "unlabeled": 10}
    assert all(r["split"] == name for name, rs in got.items() for r in rs)
    assert got["test"] == [r for r in rows if r["split"] == "test"]  # In file order.
    bad = rows[:3] + [{"text": "no split here", "label": 0}]
    spec = f"jsonl:{_write_jsonl(tmp_path / 'bad.jsonl', bad)}"
    with pytest.raises(ValueError, match=r"bad.jsonl:4: no 'split' field; the first record has "
                                         r"one, so every record needs one of train"):
        data.read_source(spec, "test")
    train_rows = [dict(r, split="train") for r in rows]
    only_train = f"jsonl:{_write_jsonl(tmp_path / 'tr.jsonl', train_rows)}"
    with pytest.raises(ValueError, match="has no split 'test'; its splits: train "):
        pipeline.open_source(only_train, split="test")


def test_a_file_without_splits_is_split_by_a_hash_of_the_text(tmp_path, capsys):
    rows = _rows(600) + [_rows(1)[0]] * 3  # A repeated text stays in one split.
    spec = f"jsonl:{_write_jsonl(tmp_path / 'h.jsonl', rows)}"
    got = {name: _both(spec, name) for name in ("train", "validation", "test")}
    assert "split by a hash of each record's text, 70 % train" in capsys.readouterr().err
    assert sum(len(r) for r in got.values()) == len(rows)
    for name, fraction in splits.HASH_FRACTIONS.items():  # Each row where its hash puts it.
        assert all(splits.hash_split(r["text"]) == name for r in got[name])
        assert abs(len(got[name]) / len(rows) - fraction) < 0.05
    assert not _texts(got["train"]) & _texts(got["test"])
    assert not _texts(got["train"]) & _texts(got["validation"])
    assert not _texts(got["validation"]) & _texts(got["test"])
    assert _both(spec, "all") == rows
    with pytest.raises(ValueError, match="has no split 'unlabeled'"):
        data.read_source(spec, "unlabeled")
    # builtin:stdlib_docs splits by the same rule.
    assert all(splits.hash_split(e["text"]) == "test"
               for e in data.read_source("builtin:stdlib_docs", "test[:50]"))


def test_text_sources_have_one_split(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(f"doc {i}" for i in range(10)) + "\n")
    assert [r["text"] for r in _both(f"text:{path}", "train[90%:]")] == ["doc 9"]
    with pytest.raises(ValueError, match=f"text:{path} has no split 'test'; its splits: train"):
        pipeline.open_source(f"text:{path}", split="test")


@pytest.mark.parametrize("record, message", [
    ({"text": None, "label": 0}, "field 'text' must be a string, got null None"),
    ({"text": 12345, "label": 0}, "field 'text' must be a string, got int 12345"),
    ({"label": 0}, "example lacks field 'text'"),
    ({"text": "x", "label": 0.84}, "field 'label' must be an integer class index or a label "
                                   "string, got float 0.84"),
    ({"text": "x", "label": True}, "got bool True"),
    ({"text": "x", "label": 9}, "field 'label' 9 out of range"),
    ({"text": "x", "label": "zebra"}, "unknown label 'zebra'"),
])
def test_typed_records_are_refused_naming_file_line_and_field(tmp_path, tok, record, message):
    rows = [{"text": "fine", "label": 1, "split": "test"}, dict(record, split="test")]
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    kw = dict(max_input_length=16, max_target_length=4)
    with pytest.raises(ValueError, match=f"bad.jsonl:2: stdlib_docs.*{message}") as err:
        pipeline.eval_batches(f"jsonl:{path}", "stdlib_docs", tok, global_batch_size=2,
                          split="test", **kw)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{message}"):
        pipeline.train_batches(f"jsonl:{path}", "stdlib_docs", tok, global_batch_size=2, seed=0,
                           split="test", **kw)


def test_hf_datasets_follow_the_same_split_rules(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    files = {"train": _rows(20, "tr"), "validation": _rows(5, "va"), "test": _rows(7, "te")}
    saved = str(tmp_path / "saved")
    datasets.DatasetDict({name: datasets.Dataset.from_list(rows)
                          for name, rows in files.items()}).save_to_disk(saved)
    for name, rows in files.items():
        assert _both(f"hf:{saved}", name) == rows
    assert _both(f"hf:{saved}", "train[:25%]+test[-1:]") == files["train"][:5] + files["test"][-1:]
    with pytest.raises(ValueError, match=f"hf:{saved} has no split 'unlabeled'; its splits: "
                                         "train, validation, test"):
        pipeline.open_source(f"hf:{saved}", split="unlabeled")
    # One Dataset: its "split" column, else the hash of the text, as a jsonl file.
    single = str(tmp_path / "single")
    rows = _rows(300)
    datasets.Dataset.from_list(rows).save_to_disk(single)
    assert _both(f"hf:{single}", "test") == [r for r in rows
                                             if splits.hash_split(r["text"]) == "test"]
    tagged = str(tmp_path / "tagged")
    datasets.Dataset.from_list([dict(r, split="validation" if i < 4 else "train")
                                for i, r in enumerate(rows)]).save_to_disk(tagged)
    assert [r["text"] for r in _both(f"hf:{tagged}", "validation")] == \
        [r["text"] for r in rows[:4]]
    # Data files that `datasets.load_dataset` reads, split by their names.
    csv = tmp_path / "csv"
    csv.mkdir()
    for name, split_rows in files.items():
        datasets.Dataset.from_list(split_rows).to_csv(str(csv / f"{name}.csv"))
    assert _both(f"hf:{csv}", "validation") == files["validation"]
    with pytest.raises(FileNotFoundError, match="hf:/no/such: no such file"):
        data.read_source("hf:/no/such")
