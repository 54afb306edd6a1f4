"""Tasks declared by JSON task files (task_file.py), the built-ins among them."""
import json

import numpy as np
import pytest

from test_data import tok  # noqa: F401 (shared fixture)
from variator_jax import data, task_file
from variator_jax.objectives import eval_summary

PKGDOC = {"name": "pkgdoc", "kind": "classification", "labels": ["algebra", "graphs", "templates"],
          "inputs": ["text"]}


def _task_file(tmp_path, declaration, name="task.json"):
    path = tmp_path / name
    path.write_text(json.dumps(declaration), encoding="utf-8")
    return str(path)


def test_every_builtin_task_is_a_declaration_a_file_can_hold(tmp_path):
    for name, declaration in task_file.BUILTIN.items():
        declared = data.get_task(_task_file(tmp_path, dict(declaration, name=name), f"{name}.json"))
        assert declared == data.TASKS[name]
        assert declared.origin == f"task file {tmp_path / name}.json"
    # The GLUE tasks keep GLUE's metrics, headline first.
    assert data.get_task("mrpc").metrics == ("f1", "accuracy")
    assert data.get_task("qqp").metrics == ("accuracy", "f1")


def test_a_declared_task_formats_labels_and_scores(tmp_path, tok):
    task = data.get_task(_task_file(tmp_path, PKGDOC))
    assert task.name == "pkgdoc" and task.kind == "classification"
    example = {"text": "Solve x + 1 = 2.", "label": "algebra"}
    assert task.format(example) == ("pkgdoc text: Solve x + 1 = 2.", "algebra")
    assert task.label_index({"text": "t", "label": 2}) == 2
    assert task.verbalizer_ids(tok).tolist() == [ord(c) + 3 for c in "agt"]
    with pytest.raises(ValueError, match="unknown label 'geometry'; known: algebra, graphs"):
        task.label_index({"text": "t", "label": "geometry"})
    # Its metrics are what eval summaries report, by name or by file.
    f1_first = _task_file(tmp_path, dict(PKGDOC, labels=["no", "yes"], metrics=["f1", "accuracy"]),
                          "f1.json")
    preds = {"pred": np.asarray([1, 1, 0, 0]), "label": np.asarray([1, 0, 0, 0]),
             "weight": np.ones(4)}
    sums = {"ce_sum": 2.0, "ce_n": 4.0}
    assert list(eval_summary(f1_first, sums, preds)) == ["ce", "f1", "accuracy"]
    assert eval_summary(f1_first, sums, preds)["f1"] == pytest.approx(2 / 3)
    assert list(eval_summary(task, sums, preds)) == ["ce", "accuracy"]
    generation = data.get_task(_task_file(tmp_path, {"name": "qa", "kind": "generation",
                                                     "inputs": ["question"]}, "qa.json"))
    assert generation.format({"question": "Who?", "answers": ["Ann", "Bo"]}) == \
        ("qa question: Who?", "Ann")
    assert generation.references({"question": "Who?", "targets": "Ann"}) == ["Ann"]


@pytest.mark.parametrize("change, message", [
    ({"label": ["a", "b"]}, "unknown key 'label'; known keys: name, kind, labels"),
    ({"labels": None}, "'labels' must be a non-empty list of non-empty strings"),
    ({"labels": ["algebra", "algebra"]}, "'labels' must be two or more distinct words"),
    ({"kind": "regression"}, "'kind' must be one of classification, generation"),
    ({"name": "pkg doc"}, "'name' must be letters, digits"),
    ({"inputs": "text"}, "'inputs' must be a non-empty list"),
    ({"metrics": ["f1"]}, "metric 'f1' needs two labels"),
    ({"metrics": ["bleu"]}, "'metrics' of a classification task must be from accuracy, f1"),
])
def test_bad_task_files_are_refused_in_one_line_naming_the_file(tmp_path, change, message):
    path = _task_file(tmp_path, {k: v for k, v in dict(PKGDOC, **change).items()
                                 if v is not None})
    with pytest.raises(ValueError, match=f"task file {path}: {message}") as err:
        data.get_task(path)
    assert "\n" not in str(err.value)


def test_unreadable_task_files_and_clashing_label_words(tmp_path, tok):
    broken = tmp_path / "broken.json"
    broken.write_text("{name: 1", encoding="utf-8")
    with pytest.raises(ValueError, match=f"task file {broken}: not valid JSON"):
        data.get_task(str(broken))
    with pytest.raises(FileNotFoundError, match="task file /no/such.json: no such file"):
        data.get_task("/no/such.json")
    clash = _task_file(tmp_path, dict(PKGDOC, labels=["graphs", "grammar"]))
    with pytest.raises(ValueError, match=f"task file {clash}: labels 'graphs' and 'grammar' "
                                         "share their first token"):
        data.get_task(clash).verbalizer_ids(tok)
