"""What the user sees while training and evaluating: metrics.jsonl, TensorBoard, progress lines."""
from __future__ import annotations

import datetime
import json
import os
import socket
import time

import jax

METRICS_FILE = "metrics.jsonl"


def say(msg: str) -> None:
    """A line for the user, from process 0 only."""
    if jax.process_index() == 0:
        print(msg, flush=True)


class MetricWriter:
    """`WORKDIR/metrics.jsonl` (one JSON object per logged step) and TensorBoard scalars
    under `WORKDIR/tensorboard`, from process 0 only.

    Events go through tensorboard's own record writer onto a plain file: clu's
    `SummaryWriter` (and tensorboard's `EventFileWriter`) import TensorFlow when it is
    installed, ten seconds per start on a small CPU machine, for a few scalars.
    """

    def __init__(self, workdir: str, resume_step: int = 0):
        self._enabled = jax.process_index() == 0
        self._path = os.path.join(workdir, METRICS_FILE)
        self._events = None
        if not self._enabled:
            return
        self._truncate(resume_step)
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.summary.writer.record_writer import RecordWriter
        logdir = os.path.join(workdir, "tensorboard")
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
        self._events = RecordWriter(open(os.path.join(logdir, name), "wb"))
        self._events.write(Event(wall_time=time.time(), file_version="brain.Event:2")
                           .SerializeToString())

    def _truncate(self, resume_step: int) -> None:
        """A run resumed from step s repeats the steps after s: drop their old lines."""
        if not os.path.isfile(self._path):
            return
        kept = [ln for ln, parsed in _read_jsonl(self._path)
                if parsed is not None and parsed.get("step", 0) <= resume_step]
        with open(self._path, "w") as f:
            f.writelines(kept)

    def last(self) -> dict[str, float]:
        """The last training line written (what a resumed-at-the-end run reports)."""
        if not os.path.isfile(self._path):
            return {}
        lines = [parsed for _, parsed in _read_jsonl(self._path) if parsed is not None]
        train = [ln for ln in lines if "loss" in ln]
        return {k: v for k, v in train[-1].items() if k != "step"} if train else {}

    def lowest_loss(self) -> float | None:
        """The lowest training loss logged so far (a resumed run's yardstick for spikes)."""
        if not os.path.isfile(self._path):
            return None
        losses = [p["loss"] for _, p in _read_jsonl(self._path)
                  if p is not None and isinstance(p.get("loss"), (int, float))]
        return min(losses) if losses else None

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self._enabled:
            return
        with open(self._path, "a") as f:
            f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}})
                    + "\n")
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        summary = Summary(value=[Summary.Value(tag=k, simple_value=float(v))
                                 for k, v in scalars.items()])
        self._events.write(Event(wall_time=time.time(), step=int(step), summary=summary)
                           .SerializeToString())
        self._events.flush()

    def close(self) -> None:
        if self._events is not None:
            self._events.close()


def _read_jsonl(path: str) -> list[tuple[str, dict | None]]:
    """(line, parsed object or None) for each non-blank line; a line cut short by a crash or
    a full disk parses to None (and is then dropped, not fatal)."""
    out = []
    with open(path) as f:
        for ln in f:
            if not ln.strip():
                continue
            try:
                parsed = json.loads(ln)
            except ValueError:
                parsed = None
            out.append((ln if ln.endswith("\n") else ln + "\n",
                        parsed if isinstance(parsed, dict) else None))
    return out


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_line(step: int, total: int, scalars: dict[str, float]) -> str:
    """e.g. `step  40/100  loss 1.23e-02 (enc_mse 1.0e-02 dec_mse 2.3e-03)  lr 9.8e-04 ...`"""
    terms = " ".join(f"{k} {scalars[k]:.3e}" for k in ("enc_mse", "dec_mse", "task_ce")
                     if k in scalars)
    width = len(str(total))
    eta = (total - step) / scalars["steps_per_sec"] if scalars.get("steps_per_sec") else 0.0
    return (f"step {step:>{width}}/{total}  loss {scalars['loss']:.4e} ({terms})  "
            f"lr {scalars['lr']:.2e}  grad_norm {scalars['grad_norm']:.3g}  "
            f"{scalars.get('steps_per_sec', 0):.2f} steps/s  "
            f"{scalars.get('tokens_per_sec', 0) / 1e3:.1f}k tokens/s  "
            f"ETA {_format_duration(eta)}")


PROGRESS_EVERY_S = 10.0  # Seconds between progress lines of a long evaluation.


class Progress:
    """`data` (eval batches) that, while iterated, prints every PROGRESS_EVERY_S seconds the
    examples done, their rate and the time left, and at the end how long the pass took.
    Other attributes (`num_examples`, `references`) are `data`'s."""

    def __init__(self, data, label: str, batch_size: int):
        self.data, self.label, self.batch_size = data, label, batch_size

    def __getattr__(self, name):
        return getattr(self.data, name)

    def __len__(self):
        return len(self.data)

    def __iter__(self):
        total = int(getattr(self.data, "num_examples", 0) or 0)
        start = last = time.perf_counter()
        examples = 0
        for done, batch in enumerate(self.data, 1):
            yield batch
            examples = min(total, done * self.batch_size) if total else done * self.batch_size
            now = time.perf_counter()
            if now - last >= PROGRESS_EVERY_S and examples < total:
                last, rate = now, examples / (now - start)
                eta = datetime.timedelta(seconds=round((total - examples) / rate))
                say(f"  {self.label}: {examples:,}/{total:,} examples, "
                    f"{rate:.1f} examples/s, ETA {eta}")
        say(f"  {self.label}: {examples:,} examples in {time.perf_counter() - start:.1f}s")
