"""Fault injection (issue 27): every fault a user can cause ends in one clear line or a
correct result, and never touches what was saved before.

One tiny run is trained once (module fixture); each case then runs a real entry point
(train.py, eval.py, `python -m variator_jax.convert`, `python -m benchmarks.serve`) on a copy
of it with one fault: bad flags, a hostile or mistyped file, a closed pipe, Ctrl-C, a
read-only or full file system, a file-size limit, edited data. The cases run side by side
(one pool, so the suite costs about the slowest of them) and each asserts the exit status,
a single stderr line without "Traceback", and that every file saved before is
byte-identical.

Read-only and full file systems are real where this process may make a private mount
namespace (`unshare -m`, as root): a read-only bind mount of the workdir (EROFS) and a
tiny, pre-filled tmpfs (ENOSPC), visible to the one command only and gone with it. Where
it may not, those two cases are skipped; the file-size limit (`RLIMIT_FSIZE` via
an exec wrapper, EFBIG) runs everywhere and stands for a full disk.
"""
from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

import test_utils as tu
from variator_jax import (
    boundary,
    checkpoint,
    errors,
    fileio,
    integrity,
    plugin_file,
    train,
    trainer,
)
from variator_jax import run as run_lib
from variator_jax.convert import torch_load_weights_only
from variator_jax.errors import CheckpointError

TRAIN = {**tu.TINY_OVERRIDES, "total_steps": 8, "checkpoint_every": 4}


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


UNSHARE = _can_unshare()


# -- The run every case starts from ---------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny backbone, a `text:` corpus and a pretrain run on it, finished at step 8."""
    root = tmp_path_factory.mktemp("faults")
    hf_dir = tu.make_hf_dir(str(root / "hf"))
    from pydoc_data.topics import topics
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(t.split()) for _, t in sorted(topics.items())[:80]))
    config = tu.tiny_plugin_config(hf_dir, **{"data__train": f"text:{corpus}",
                                              "data__train_split": "", "total_steps": 8})
    workdir = str(root / "run")
    train.train_and_evaluate(config, workdir)
    return {"root": root, "hf": hf_dir, "corpus": str(corpus), "workdir": workdir}


def _snapshot(directory) -> dict[str, str]:
    """{relative path: SHA-256} of every file; `.lock` (the live run's PID) aside."""
    out = {}
    for base, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(base, name)
            if name != run_lib.LOCK_FILE:
                with open(path, "rb") as f:
                    out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _train_flags(t, workdir, **overrides) -> list[str]:
    flags = {**TRAIN, "data.train": f"text:{t['corpus']}", "data.train_split": "", **overrides}
    return ["train.py", "--config=configs/plugin.py:stage=pretrain",
            f"--config.backbone={t['hf']}", f"--workdir={workdir}", *tu.cli_flags(flags)]


def _eval_flags(t, workdir, *extra) -> list[str]:
    flags = {**TRAIN, "data.eval": f"text:{t['corpus']}", "data.eval_split": ""}
    return ["eval.py", "--config=configs/plugin.py:stage=pretrain",
            f"--config.backbone={t['hf']}", f"--workdir={workdir}", *tu.cli_flags(flags), *extra]


def _copy(t, name: str) -> str:
    out = str(t["root"] / "cases" / name)
    shutil.copytree(t["workdir"], out)
    return out


# Runs ARGV under a file-size limit (RLIMIT_FSIZE, bytes): set in a small exec wrapper,
# not a `preexec_fn`, which would fork this multithreaded (JAX) process.
_LIMITED = ("import os, resource, sys; n = int(sys.argv[1]); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); "
            "os.execv(sys.argv[2], sys.argv[2:])")


def _in_namespace(mounts: str, argv: list[str]) -> list[str]:
    """`argv` in a private mount namespace after the shell commands `mounts`."""
    return ["unshare", "-m", "sh", "-ec", f'{mounts}\nexec "$@"', "sh", *argv]


# -- Each case: a command with one fault and what it must end in ---------------------------------
def _cases(t) -> dict[str, dict]:
    """name -> argv (script or -m module first), the expected exit status and line, and the
    directory whose files must stay byte-identical; `unshare` (mount commands),
    `fsize` (a file-size limit), `signal_on` (a stdout line prefix that triggers SIGINT) and
    `close_stdout` add the fault."""
    root = t["root"] / "cases"
    root.mkdir(exist_ok=True)
    cases = {}
    w = _copy(t, "dtype")
    cases["train: --config.dtype=bogus"] = dict(
        argv=_train_flags(t, w, dtype="bogus"), rc=1, line="config.dtype 'bogus' is not a "
        "floating-point type", same=w)
    file_workdir = root / "a_file"
    file_workdir.write_text("not a directory\n")
    cases["train: the workdir is a file"] = dict(
        argv=_train_flags(t, file_workdir), rc=1, line=f"{file_workdir}: Not a directory")
    w = str(root / "refused")
    cases["train: init_plugin of another ratio (a refused start)"] = dict(
        argv=_train_flags(t, w, init_plugin=os.path.join(t["workdir"], "plugin"),
                          **{"plugin.ratio": 2}),
        rc=1, line="has ratio=4", absent=os.path.join(w, run_lib.RUN_FILE))
    w = str(root / "fsize")
    # The limit stops the first save whose files outgrow it: step 4's, or, when its files
    # come out a little smaller, step 8's; either way the run must stop at that step.
    cases["train: a file-size limit at a save (stops at that step)"] = dict(
        argv=_train_flags(t, w, log_every=1), fsize=20_000, rc=1,
        line=f"in {w}/checkpoints: File too large", stopped_at=(w, None))
    w = _copy(t, "uncommitted")
    os.rename(os.path.join(w, "checkpoints", "8"),
              os.path.join(w, "checkpoints", "8.orbax-checkpoint-tmp"))
    cases["train: extending a run whose last save never committed"] = dict(
        argv=_train_flags(t, w, total_steps=12) + ["--override=total_steps"], rc=0,
        out="checkpoint 8 in " + os.path.join(w, "checkpoints") + " was never committed (the "
        "run stopped while saving it) and is discarded; resuming from step 4")
    cases["train: --help into a closed pipe"] = dict(
        argv=["train.py", "--config=plugin", "--help"], close_stdout=True, rc=141, line=None)
    w = _copy(t, "eval_fsize")
    cases["eval: a file-size limit (a full disk) before evaluating"] = dict(
        argv=_eval_flags(t, w), fsize=0, rc=1,
        line=f"{w}/eval: File too large; a file-size limit", same=w)
    w = _copy(t, "eval_dtype")
    cases["eval: --config.dtype=bogus"] = dict(
        argv=_eval_flags(t, w, "--config.dtype=bogus"), rc=1,
        line="error: config.dtype 'bogus' is not a floating-point type", same=w)
    w = _copy(t, "eval_sigint")
    cases["eval: Ctrl-C while evaluating"] = dict(
        argv=_eval_flags(t, w), signal_on="evaluating ", rc=130,
        line="interrupted before the results were written; rerun the same command", same=w)
    w = _copy(t, "typo")
    typo = os.path.join(w, "plugin")
    config = json.loads(open(os.path.join(typo, "plugin_config.json")).read())
    config["ratiio"] = config["ratio"]
    with open(os.path.join(typo, "plugin_config.json"), "w") as f:
        json.dump(config, f)
    cases["eval: plugin_config.json with a typo 'ratiio'"] = dict(
        argv=_eval_flags(t, w), rc=1, line="unknown field 'ratiio' (did you mean 'ratio'?)",
        same=w)
    random_bytes = root / "random.pkl"
    random_bytes.write_bytes(bytes(range(7, 256)) * 9)
    cases["convert: random bytes as a released plugin"] = dict(
        argv=["-m", "variator_jax.convert", "released", str(random_bytes), str(root / "out"),
              "--backbone", t["hf"]], rc=1, line="not a PyTorch checkpoint",
        absent=str(root / "out"))
    cases["serve: --lengths=-5 --batch-sizes=0"] = dict(
        argv=["-m", "benchmarks.serve", "--lengths=-5", "--batch-sizes=0",
              f"--out={root / 'serve'}"],
        rc=1, line="--batch-sizes '0': expected comma-separated integers >= 1",
        absent=str(root / "serve"))
    if UNSHARE:
        w = _copy(t, "eval_ro")
        cases["eval: a read-only workdir (bind mount)"] = dict(
            argv=_eval_flags(t, w), unshare=f"mount --bind {w} {w}\n"
                                            f"mount -o remount,ro,bind {w}",
            rc=1, line=f"{w}/eval: Read-only file system; use a writable directory", same=w)
        w = str(root / "tmpfs")
        os.makedirs(w)
        cases["train: a full disk (a 64 KiB tmpfs) before training"] = dict(
            argv=_train_flags(t, w), unshare=f"mount -t tmpfs -o size=64k tmpfs {w}\n"
                                             f"head -c 40000 /dev/zero > {w}/filler",
            rc=1, line=f"{w}: No space left on device", same=w)
    return cases


def _run_case(case: dict) -> tuple[int, str, str]:
    env = dict(os.environ, PYTHONPATH=tu.REPO, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env.pop(boundary.DEBUG_ENV, None)
    env.pop("VARIATOR_TRACEBACK", None)
    first, *rest = case["argv"]
    argv = [sys.executable, os.path.join(tu.REPO, first) if first.endswith(".py") else first,
            *rest]
    if "fsize" in case:
        argv = [sys.executable, "-c", _LIMITED, str(case["fsize"]), *argv]
    if case.get("unshare"):
        argv = _in_namespace(case["unshare"], argv)
    proc = subprocess.Popen(argv, cwd=tu.REPO, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out = []
    if case.get("close_stdout"):
        proc.stdout.close()
    elif case.get("signal_on"):
        for line in proc.stdout:
            out.append(line)
            if line.startswith(case["signal_on"]):
                proc.send_signal(signal.SIGINT)
                break
    rest_out, err = proc.communicate(timeout=400)
    return proc.returncode, "".join(out) + (rest_out or ""), err


@pytest.fixture(scope="module")
def outcomes(trained):
    """Every case run at once: name -> (case, (exit status, stdout, stderr))."""
    cases = _cases(trained)
    before = {name: _snapshot(c["same"]) for name, c in cases.items() if c.get("same")
              and os.path.isdir(c["same"])}
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        runs = dict(zip(cases, pool.map(_run_case, cases.values()), strict=True))
    return {name: (case, runs[name], before.get(name)) for name, case in cases.items()}


CASE_NAMES = [
    "train: --config.dtype=bogus", "train: the workdir is a file",
    "train: init_plugin of another ratio (a refused start)",
    "train: a file-size limit at a save (stops at that step)",
    "train: extending a run whose last save never committed",
    "train: --help into a closed pipe",
    "eval: a file-size limit (a full disk) before evaluating", "eval: --config.dtype=bogus",
    "eval: Ctrl-C while evaluating",
    "eval: plugin_config.json with a typo 'ratiio'", "convert: random bytes as a released plugin",
    "serve: --lengths=-5 --batch-sizes=0", "eval: a read-only workdir (bind mount)",
    "train: a full disk (a 64 KiB tmpfs) before training",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_a_fault_ends_in_one_line_and_keeps_what_was_saved(outcomes, name):
    if name not in outcomes:
        pytest.skip("needs a private mount namespace (unshare -m, as root)")
    case, (rc, out, err), before = outcomes[name]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == case["rc"], (name, rc, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    if case["rc"] == 0:
        assert case["out"] in out, out[-3000:]
    elif case["line"] is None:
        assert not lines, err  # A closed pipe: a quiet exit.
    else:
        assert len(lines) == 1 and case["line"] in lines[0], (name, err)
        assert lines[0].startswith("interrupted" if rc == 130 else "error: "), lines[0]
    if before is not None:
        assert _snapshot(case["same"]) == before, name
    if case.get("absent"):
        assert not os.path.exists(case["absent"]), case["absent"]
    if case.get("stopped_at"):
        workdir, step = case["stopped_at"]
        if step is None:  # The step whose save failed, as the line names it.
            step = int(re.search(r"cannot save checkpoint (\d+) ", lines[0]).group(1))
        assert tu.read_metrics(workdir)[-1]["step"] == step  # Not steps after the failed save.
        assert all(s < step for s in checkpoint.finished_steps(workdir))


def test_a_refused_start_leaves_the_workdir_usable(outcomes, trained):
    """Issue 27 case 11: the corrected command is not refused as "another run"."""
    workdir = str(trained["root"] / "cases" / "refused")
    assert not os.path.exists(os.path.join(workdir, run_lib.RUN_FILE))
    assert not os.path.exists(os.path.join(workdir, run_lib.CONFIG_FILE))
    run_lib.check_identity(workdir, {"stage": "pretrain", "anything": 1})  # Raises if not.


def test_a_data_file_edited_in_place_is_refused_naming_it(outcomes, trained):
    """Issue 27 case 2: same document count, other text; runs after the pool (it edits the
    corpus every case reads)."""
    corpus = trained["corpus"]
    original = open(corpus).read()
    workdir = _copy(trained, "edited")
    before = _snapshot(workdir)
    try:
        with open(corpus, "w") as f:
            f.write(original.replace("e", "E"))
        rc, _, err = _run_case(dict(argv=_train_flags(trained, workdir, total_steps=12)
                                    + ["--override=total_steps"]))
        refused = _snapshot(workdir)
        # Accepted when asked (train.py's --accept_data_change), and recorded.
        accepted = _copy(trained, "accepted")
        config = tu.tiny_plugin_config(trained["hf"], **{
            "data__train": f"text:{corpus}", "data__train_split": "", "total_steps": 12})
        result = train.train_and_evaluate(config, accepted, override=["total_steps"],
                                              accept_data_change=True)
    finally:
        with open(corpus, "w") as f:
            f.write(original)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 1 and len(lines) == 1, err
    assert lines[0] == (f"error: data.train: {corpus} changed (same size, other content) since "
                        "this run began; it trained to step 8 on the old data, and resuming "
                        "would train on both: pass --accept_data_change to accept and record "
                        "that, or use another --workdir"), lines[0]
    assert refused == before
    assert result["step"] == 12
    recorded = [c for c in run_lib.read_changes(accepted) if c["field"] != "total_steps"]
    assert [(c["step"], c["field"]) for c in recorded] == [(8, "data.train content")]
    assert recorded[0]["to"]["files"][0]["sha256"] != recorded[0]["from"]["files"][0]["sha256"]


# -- The pieces, in process (fast) ---------------------------------------------------------------
def test_data_fingerprints_see_an_edit_and_accept_it_only_when_asked(tmp_path):
    data = tmp_path / "a.txt"
    data.write_text("one document\n\nanother one\n")
    source = {"data.train": integrity.source_fingerprint(f"text:{data}")}
    run_lib.write_data(str(tmp_path), source)
    assert run_lib.check_data(str(tmp_path), source, resume_step=4) == {}
    data.write_text("one document\n\nanother two\n")
    edited = {"data.train": integrity.source_fingerprint(f"text:{data}")}
    with pytest.raises(errors.DataChanged, match=f"data.train: {data} changed"):
        run_lib.check_data(str(tmp_path), edited, resume_step=4)
    assert run_lib.check_data(str(tmp_path), edited, resume_step=0) == {}  # A fresh start.
    changes = run_lib.check_data(str(tmp_path), edited, resume_step=4, accept=True)
    assert list(changes) == ["data.train content"]
    data.write_text("one document\n\nanother one, longer\n")
    grown = {"data.train": integrity.source_fingerprint(f"text:{data}")}
    with pytest.raises(errors.DataChanged, match=r"\(size 26 -> 34 bytes\)"):
        run_lib.check_data(str(tmp_path), grown, resume_step=4)


@pytest.mark.parametrize("code,hint", [
    (errno.ENOSPC, "No space left on device; free some space"),
    (errno.EROFS, "Read-only file system; use a writable directory"),
    (errno.EACCES, "Permission denied; use a path you may read and write"),
    (errno.EFBIG, "File too large; a file-size limit"),
])
def test_os_errors_are_one_line_naming_the_path(code, hint):
    line = boundary.describe(OSError(code, os.strerror(code), "/runs/x/eval"))
    assert line.startswith("/runs/x/eval: " + hint.split(";")[0]) and hint in line, line


def test_the_boundary_exit_codes_and_the_debug_switch(monkeypatch, capsys):
    def fail(exc):
        def raise_it():
            raise exc
        return raise_it
    monkeypatch.delenv(boundary.DEBUG_ENV, raising=False)
    monkeypatch.delenv("VARIATOR_TRACEBACK", raising=False)
    for exc, code, line in (
            (KeyboardInterrupt(), 130, "interrupted; nothing more was done"),
            (errors.Interrupted("interrupted at step 3; rerun", signal.SIGTERM), 143,
             "interrupted at step 3; rerun"),
            (ZeroDivisionError("x"), 1, "error: internal error (ZeroDivisionError: x); rerun "
                                        "with --debug"),
            (errors.UserError("bad\ninput"), 1, "error: bad input")):
        with pytest.raises(SystemExit) as e:
            boundary.guard(fail(exc))
        err = capsys.readouterr().err
        assert e.value.code == code and len(err.splitlines()) == 1 and err.startswith(line), err
    # --debug sets the variable for child processes; setenv makes monkeypatch unset it after
    # this test, or every later test's subprocesses would print tracebacks.
    monkeypatch.setenv(boundary.DEBUG_ENV, "")
    monkeypatch.setattr(sys, "argv", ["x", "--debug"])
    with pytest.raises(ZeroDivisionError):  # --debug: the traceback, as it was.
        boundary.guard(fail(ZeroDivisionError("x")))
    assert sys.argv == ["x"] and os.environ[boundary.DEBUG_ENV] == "1"


def test_a_second_ctrl_c_names_the_checkpoint_a_rerun_resumes_from(tmp_path):
    def commit(step):
        os.makedirs(tmp_path / "checkpoints" / str(step))
        (tmp_path / "checkpoints" / str(step) / "_CHECKPOINT_METADATA").write_text("{}")
    assert str(trainer._interrupted(3, str(tmp_path))) == (
        "interrupted at step 3; rerun the same command to start over: no checkpoint was saved")
    commit(4)
    (tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-123").mkdir()
    assert str(trainer._interrupted(7, str(tmp_path))) == (
        "interrupted at step 7; rerun the same command to resume from step 4, the last "
        "checkpoint saved")
    assert str(trainer._interrupted(4, str(tmp_path))).endswith("rerun the same command to resume")
    assert checkpoint.uncommitted_steps(str(tmp_path)) == [8]


def test_check_writable_leaves_nothing_and_names_what_is_in_the_way(tmp_path):
    fileio.check_writable(str(tmp_path / "new" / "eval"))
    assert os.listdir(tmp_path) == []  # Probed in tmp_path; nothing created.
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="a file is in the way") as e:
        fileio.check_writable(str(tmp_path / "file" / "eval"))
    assert e.value.filename == str(tmp_path / "file")
    with pytest.raises(OSError, match="No space left on device") as e:
        fileio.check_writable(str(tmp_path), need_bytes=1 << 62)
    assert e.value.errno == errno.ENOSPC


def test_hostile_and_mistyped_files_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"unknown field 'ratiio' \(did you mean 'ratio'\?\)"):
        plugin_file.check_config({"ratiio": 4, "ratio": 4, "bottleneck": 8, "d_model": 32,
                                  "num_layers": 2, "mask_aware": True, "scope": "ffn"}, "p.json")
    junk = tmp_path / "pytorch_model.bin"
    junk.write_bytes(bytes(range(7, 256)))
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint .* begins with") as e:
        torch_load_weights_only(str(junk))
    assert "pickled" not in str(e.value)
    (tmp_path / run_lib.RUN_FILE).write_text("[1, 2]")
    with pytest.raises(errors.WorkdirMismatch, match="run.json: not a JSON object"):
        run_lib.check_identity(str(tmp_path), {"stage": "pretrain"})
