"""Your own task through the stage chain (variator_jax/stages.py) and train.py: a task
file and a jsonl directory, named results, and held-out texts kept out of training."""
import json
import os

import pytest

from test_data import _private_index_cache  # noqa: F401 (shared fixture)
from variator_jax import data, stages, train
from variator_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Three of the standard library's packages, under label words of our own.
WORDS = {1: "mail", 3: "logs", 6: "tests"}  # stdlib_docs label index -> our label word.
SIZES = {"train": 60, "validation": 12, "test": 12}


def _own_task(root, leak=False):
    """A task file and a jsonl:DIR of train/validation/test.jsonl, as a user would write them."""
    task = root / "pkgdoc.json"
    task.write_text(json.dumps({"name": "pkgdoc", "kind": "classification",
                                "labels": list(WORDS.values()), "inputs": ["doc"]}))
    rows = {}
    for split, n in SIZES.items():
        rows[split] = [{"doc": e["text"], "label": WORDS[e["label"]]}
                       for e in data.read_source("builtin:stdlib_docs", split)
                       if e["label"] in WORDS][:n]
    if leak:  # One training row also in the test split.
        rows["test"][5] = rows["train"][17]
    directory = root / "pkgdoc"
    directory.mkdir()
    for split, split_rows in rows.items():
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows))
    return str(task), f"jsonl:{directory}", rows


def _results_listing():
    results = os.path.join(REPO, "benchmarks", "results")
    return {f: os.stat(os.path.join(results, f)).st_mtime_ns for f in os.listdir(results)}


def test_a_declared_task_on_a_jsonl_directory_runs_the_whole_pipeline(tmp_path, capsys):
    task, spec, rows = _own_task(tmp_path)
    before = _results_listing()
    stages.main(["--preset=tiny", "--ratios=2", "--ablation_ratios=", "--speed_repeats=1",
                 f"--task={task}", f"--data={spec}", f"--workdir={tmp_path / 'work'}"])
    assert "Estimate: about" in capsys.readouterr().out  # Printed before stage (a).
    assert _results_listing() == before  # The committed results are untouched.
    (name,) = [p for p in os.listdir(tmp_path / "work" / "results") if p.endswith(".json")]
    assert name.startswith("quality-pkgdoc-cpu-")
    with open(tmp_path / "work" / "results" / name) as f:
        results = json.load(f)
    assert results["task"] == "pkgdoc" and results["num_classes"] == 3
    assert results["test_examples"] == SIZES["test"]
    assert {role: s["examples"] for role, s in results["data"]["splits"].items()} == dict(
        SIZES, adapt=SIZES["train"])
    assert results["data"]["overlap"] == 0 and results["data"]["task_file"] == task
    assert [(r["method"], r["k"]) for r in results["rows"]] == [
        ("teacher", 1), ("variator", 2), ("mean_pool", 2), ("tome", 2), ("strided", 2)]
    assert {e["label"] for e in results["examples"]} <= set(WORDS.values())
    estimate = results["estimate"]  # From the preset's steps and a step measured then.
    assert estimate["steps"] == {"lm": 2, "finetune": 2, "pretrain-k2": 2, "adapt-k2": 2}
    assert estimate["step_seconds"] > 0 and estimate["train_seconds"] >= 0
    # train.py's stages checked and recorded their own splits: fine-tuning on train, validated
    # on validation (no longer the whole directory for every name).
    with open(tmp_path / "work" / "finetune" / "result.json") as f:
        assert json.load(f)["data"] == {"train_examples": 60, "eval_examples": 12, "overlap": 0}


def test_a_test_text_in_training_or_the_corpus_is_refused(tmp_path, capsys):
    task, spec, rows = _own_task(tmp_path, leak=True)
    argv = ["--preset=tiny", f"--task={task}", f"--data={spec}"]
    with pytest.raises(SystemExit) as err:
        stages.main(argv + [f"--workdir={tmp_path / 'a'}"])
    assert "\n" not in str(err.value)
    assert f"--data {spec}: 1 example(s) of {spec} test are also in training split train" \
        in str(err.value)
    assert not os.path.exists(tmp_path / "a" / "lm")  # Refused before anything trained.
    # A clean task, but the pre-training corpus holds a test text.
    (tmp_path / "clean").mkdir()
    task, spec, rows = _own_task(tmp_path / "clean")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Some other text.\n\n" + rows["test"][3]["doc"] + "\n")
    with pytest.raises(SystemExit, match=f"test are also in the pre-training corpus text:{corpus}"):
        stages.main(["--preset=tiny", f"--task={task}", f"--data={spec}",
                     f"--corpus=text:{corpus}", f"--workdir={tmp_path / 'b'}"])


def test_train_py_refuses_an_eval_split_that_overlaps_training(tmp_path):
    import test_utils as tu
    task, spec, rows = _own_task(tmp_path, leak=True)
    c = tu.load_config("finetune", f"task={task}")
    c.variant, c.tokenizer = "t5-small", "byte"
    c.model_overrides.update(d_model=16, d_kv=4, num_heads=2, d_ff=32, num_layers=1,
                             num_decoder_layers=1)
    c.data.train, c.data.eval, c.data.eval_split = spec, spec, "test"
    c.mesh.data, c.mesh.model, c.batch_size = 1, 1, 4
    with pytest.raises(UserError, match=rf"1 example\(s\) of data.eval {spec} \(test\) are also "
                                        rf"in data.train {spec}"):
        train.train_and_evaluate(c, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "result.json")
