"""The `builtin:stdlib_docs` task (stdlib_docs.py) and the stage chain that uses it (stages.py)."""
import ast
import collections
import glob
import json
import os
import re

import numpy as np
import pytest
import transformers

from variator_jax import data, stages, stdlib_docs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _docstrings(path: str) -> set[str]:
    """The docstrings (module, classes, functions) of the Python file at `path`, each with its
    whitespace collapsed to single spaces, as stdlib_docs stores them."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    kinds = (ast.FunctionDef, ast.ClassDef, ast.Module)
    return {" ".join(ast.get_docstring(n).split()) for n in ast.walk(tree)
            if isinstance(n, kinds) and ast.get_docstring(n)}


def test_build_is_deterministic_and_splits_share_no_text():
    first, second = stdlib_docs.build.__wrapped__(), stdlib_docs.build.__wrapped__()
    assert first == second
    texts = {split: {e["text"] for e in first[split]} for split in stdlib_docs.SPLITS}
    assert not texts["train"] & texts["test"]
    assert not texts["train"] & texts["validation"]
    assert not texts["validation"] & texts["test"]
    sizes = {split: len(first[split]) for split in stdlib_docs.SPLITS}
    assert sizes["train"] > 1000 and sizes["test"] > 250 and sizes["validation"] > 120
    # Roughly 20 % test and 10 % validation, from the hash of each text.
    total = sum(sizes.values())
    assert abs(sizes["test"] / total - 0.2) < 0.04 and abs(sizes["validation"] / total - 0.1) < 0.04


def test_labels_are_the_package_each_docstring_comes_from():
    root = stdlib_docs.stdlib_root()
    # Re-derive a few labels from the sources: a docstring of asyncio/events.py is "asyncio".
    docs = _docstrings(os.path.join(root, "asyncio", "events.py"))
    examples = [e for split in stdlib_docs.build().values() for e in split]
    found = [e for e in examples if e["text"] in docs]
    assert len(found) > 10
    assert {stdlib_docs.LABELS[e["label"]] for e in found} == {"asyncio"}
    counts = collections.Counter(e["label"] for e in examples)
    assert sorted(counts) == list(range(8)) and max(counts.values()) <= stdlib_docs.MAX_PER_LABEL
    assert all(len(e["text"]) >= stdlib_docs.MIN_CHARS for e in examples)


def test_task_is_text_to_text_with_distinct_byte_verbalizers():
    task = data.get_task("stdlib_docs")
    example = data.read_source("builtin:stdlib_docs", "validation")[0]
    inputs, target = task.format(example)
    assert inputs == "stdlib_docs text: " + example["text"]
    assert target == stdlib_docs.LABELS[example["label"]]
    ids = task.verbalizer_ids(transformers.ByT5Tokenizer())
    assert len(set(ids.tolist())) == 8  # First bytes a e i l m t u x, each + 3 (ByT5 offset).
    assert ids.tolist() == [ord(label[0]) + 3 for label in stdlib_docs.LABELS]
    with pytest.raises(ValueError, match="has no split 'dev'; its splits: train, validation, "
                                         "test, unlabeled"):
        data.read_source("builtin:stdlib_docs", "dev")
    with pytest.raises(ValueError, match="has no split 'dev'"):
        data.read_source("builtin:stdlib_docs", "train+dev")
    validation = data.read_source("builtin:stdlib_docs", "validation")
    assert data.read_source("builtin:stdlib_docs", "validation[:50%]") == \
        validation[:round(len(validation) / 2)]  # Slices work here too.


def test_unlabeled_split_is_other_training_bucket_text_and_joins_with_train():
    labelled, unlabeled = stdlib_docs.build(), stdlib_docs.read("unlabeled")
    texts = {e["text"] for e in unlabeled}
    assert len(texts) == len(unlabeled) > 2000 and {e["label"] for e in unlabeled} == {-1}
    for split in stdlib_docs.SPLITS:  # No text of a labelled split, train's included.
        assert not texts & {e["text"] for e in labelled[split]}
    assert {stdlib_docs.split_of(t) for t in texts} == {"train"}  # Never a test-bucket text.
    # Re-derived from the sources: json/decoder.py's docstrings (outside the eight packages)
    # are in it exactly when long enough and in the train bucket.
    docs = _docstrings(os.path.join(stdlib_docs.stdlib_root(), "json", "decoder.py"))
    wanted = {d for d in docs if len(d) >= 40 and stdlib_docs.split_of(d) == "train"}
    assert wanted and docs & texts == wanted
    joined = data.read_source("builtin:stdlib_docs", "train+unlabeled")
    assert joined == labelled["train"] + unlabeled
    task = data.get_task("stdlib_docs")
    assert task.format(unlabeled[0]) == ("stdlib_docs text: " + unlabeled[0]["text"], "")


def _demo_paths() -> set[str]:
    """Every `demo_workdir/...` path that the docs, the Makefile and the code name."""
    files = ["README.md", "Makefile", "docs/DESIGN.md", "benchmarks/README.md",
             *glob.glob("variator_jax/**/*.py", root_dir=REPO, recursive=True),
             *glob.glob("benchmarks/*.py", root_dir=REPO)]
    found = set()
    for name in files:
        with open(os.path.join(REPO, name), encoding="utf-8") as f:
            found |= set(re.findall(r"demo_workdir/([\w./-]*\w)", f.read()))
    return found


def test_quality_command_writes_every_row(tmp_path):
    # At k = 4, as `make demo`: its workdir then holds every path the docs say it does.
    argv = ["--preset=tiny", "--ratios=4", "--ablation_ratios=4", "--speed_repeats=1",
            f"--workdir={tmp_path / 'work'}", f"--out={tmp_path / 'out'}"]
    stages.main(argv)
    (path,) = [p for p in os.listdir(tmp_path / "out") if p.endswith(".json")]
    assert path.startswith("quality-stdlib_docs-cpu-")
    with open(tmp_path / "out" / path) as f:
        results = json.load(f)
    test = data.read_source("builtin:stdlib_docs", "test")
    assert results["task"] == "stdlib_docs" and results["num_classes"] == 8
    assert results["test_examples"] == len(test)
    # Every split's size, and no held-out text in training (checked before training).
    sizes = {role: split["examples"] for role, split in results["data"]["splits"].items()}
    assert sizes == {role: len(data.read_source("builtin:stdlib_docs", split)) for role, split in
                     (("train", "train"), ("adapt", "train+unlabeled"),
                      ("validation", "validation"), ("test", "test"))}
    corpus = results["data"]["corpus"]
    assert corpus["source"] == f"text:{tmp_path / 'work' / 'corpus.txt'}"
    assert results["data"]["overlap"] == 0 and corpus["documents"] == len(
        data.read_source(corpus["source"], "all")) > 40
    majority = collections.Counter(e["label"] for e in test).most_common(1)[0][1]
    assert results["chance"] == pytest.approx(majority / len(test))
    assert [(r["method"], r["k"]) for r in results["rows"]] == [
        ("teacher", 1), ("variator", 4), ("variator_no_pretrain", 4), ("variator_task_loss", 4),
        ("mean_pool", 4), ("tome", 4), ("strided", 4)]
    for row in results["rows"]:
        assert set(row) >= {"method", "k", "accuracy", "encoder_flops_saved", "speedup", "params"}
        assert 0 <= row["accuracy"] <= 1 and np.isfinite(row["speedup"])
    teacher, variator, mean_pool = results["rows"][0], results["rows"][1], results["rows"][4]
    assert teacher["encoder_flops_saved"] == 0 and teacher["params"] == 0
    assert variator["params"] > 0 and mean_pool["params"] == 0
    # The plugin's own matmuls cost FLOPs that mean pooling does not spend.
    assert 0 < variator["encoder_flops_saved"] < mean_pool["encoder_flops_saved"]
    assert len(results["lm"]["samples"]) == 3 and "ce" in results["lm"]["eval"]
    use = results["lm"]["encoder_use"]  # Two different encoder inputs give two different CEs.
    assert use["ce"] > 0 and use["ce_swapped_encoder"] > 0 and use["gap"] != 0
    assert use["gap"] == pytest.approx(use["ce_swapped_encoder"] - use["ce"], abs=2e-4)
    # Training time per stage, kept in WORKDIR/stage_seconds.json across invocations.
    seconds = results["pipeline_seconds"]["stages"]
    assert list(seconds) == ["lm", "finetune", "pretrain-k4", "adapt-k4", "adapt-k4-no-pretrain",
                             "adapt-k4-task-loss"] and all(v > 0 for v in seconds.values())
    assert results["pipeline_seconds"]["train"] == round(sum(seconds.values()))
    with open(tmp_path / "work" / "stage_seconds.json") as f:
        assert json.load(f) == seconds
    held = results["lm"]["encoder_use_held_out"]  # All of (a)'s held-out rows: its eval CE.
    assert held["rows"] >= 1 and held["ce"] == pytest.approx(results["lm"]["eval"]["ce"], rel=1e-4)
    # Accuracy by input length: every test example in one bin, and each row's bins, weighted
    # by their sizes, give the row's accuracy that evaluate.py measured on its own batches
    # (one example may flip on a near-tie between two batchings' float rounding).
    by = results["by_length"]
    assert by["bins"] == ["1-8", "9-16", "17-32"] and sum(by["examples"]) == len(test)
    assert ([(r["method"], r["k"]) for r in by["rows"]]
            == [(r["method"], r["k"]) for r in results["rows"]])
    for row, overall in zip(by["rows"], results["rows"], strict=True):
        weighted = zip(row["accuracy"], by["examples"], strict=True)
        pooled = sum(a * c for a, c in weighted if c) / len(test)
        assert pooled == pytest.approx(overall["accuracy"], abs=1.01 / len(test)), row
    with open(tmp_path / "out" / path.replace(".json", ".md")) as f:
        assert f"17-32 tokens: {by['examples'][2]} examples" in f.read()
    for suffix in (".md", ".png"):
        assert os.path.isfile(tmp_path / "out" / path.replace(".json", suffix))
    # The layout the docs and `make serve` name (demo_workdir/finetune/backbone, ...).
    named = _demo_paths()
    assert {"finetune/backbone", "adapt-k4/plugin"} <= named
    assert [p for p in named if not os.path.exists(tmp_path / "work" / p)] == []
    # Run again, every stage is finished (its result.json): nothing left to train, and a
    # stage returns its result without training or adding to its time.
    again = stages.Pipeline(stages._parse(argv))
    assert again.steps_to_train() == {}
    finetune = again.stage("finetune", again.finetune_config(results["lm"]["backbone"]))
    assert finetune["backbone_dir"] == str(tmp_path / "work" / "finetune" / "backbone")
    with open(tmp_path / "work" / "stage_seconds.json") as f:
        assert json.load(f) == seconds


def test_quality_stage_two_learning_rate_is_chosen_per_ratio(tmp_path):
    pipeline = stages.Pipeline(stages._parse([f"--workdir={tmp_path}"]))
    lrs = {k: pipeline.plugin_config("adapt", str(tmp_path), k).lr for k in (2, 3, 4, 8)}
    assert lrs == {2: 1e-3, 3: 1e-3, 4: 1e-2, 8: 1e-3}
    # Stage 1 has no per-k rate; the paper preset keeps the configs' released ones.
    assert pipeline.plugin_config("pretrain", str(tmp_path), 4).lr == 1e-3
    paper = stages.Pipeline(stages._parse(["--preset=paper", f"--workdir={tmp_path}"]))
    assert paper.plugin_config("adapt", str(tmp_path), 4).lr == 1e-5


def test_finetune_lr_sets_stage_b_alone(tmp_path):
    default = stages.Pipeline(stages._parse([f"--workdir={tmp_path}"]))
    assert default.finetune_config(str(tmp_path)).lr == 1e-3
    wide = stages.Pipeline(stages._parse([f"--workdir={tmp_path}", "--finetune_lr=2.5e-4"]))
    assert wide.finetune_config(str(tmp_path)).lr == 2.5e-4
    assert wide.plugin_config("adapt", str(tmp_path), 4).lr == 1e-2  # The plugins' own.
    assert wide.lm_config().lr == 2e-3
