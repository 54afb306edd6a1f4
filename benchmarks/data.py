"""Input pipeline throughput and memory (issue 11): is the data ever the bottleneck?

    python -m benchmarks.data                        # 10 MB, 100 MB, 1 GB corpora + t5-base step
    python -m benchmarks.data --sizes 10,100 --no-step

For each size, a `text:` corpus of paragraphs (English-like words, ~1 KB documents) is
generated on the fly in `--tmp`, read by `pipeline.train_batches` (pre-training: span
corruption, 224 / 32 tokens, ByT5 tokenizer) in a fresh subprocess, and deleted. The
subprocess reports:
  - `open`: seconds from nothing to the first batch, index build included (cold start);
  - `tokens/s`: the tokens the train step consumes (attention + decoder masks) produced
    per second by one worker (the main process, no prefetch thread);
  - peak RSS (VmHWM) and RSS after imports; the difference is what the pipeline holds.
Then, with `--step`, the plugin pre-training step at t5-base widths (`benchmarks.train_step`,
batch `--step-batch`) on this machine, and the ratio pipeline tokens/s : step tokens/s
(target >= 3).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

_WORDS = ("the of and to in is was for on as with by that from at his an were are which this "
          "be it has also its first had one their after new two but they who been other city "
          "during school series film she not team years state world county war united").split()


def generate(path: str, megabytes: float, seed: int = 0) -> int:
    """Writes ~`megabytes` of blank-line-separated paragraphs; -> bytes written."""
    rng = np.random.default_rng(seed)
    words = np.asarray(_WORDS)
    # 4 MB of distinct paragraphs, repeated with a running number so no two documents match.
    paragraphs = [" ".join(rng.choice(words, rng.integers(80, 260))) for _ in range(3000)]
    target, written, n = int(megabytes * 1e6), 0, 0
    with open(path, "w") as f:
        while written < target:
            block = "".join(f"Article {n + i}. {p}\n\n" for i, p in enumerate(paragraphs))
            n += len(paragraphs)
            f.write(block)
            written += len(block)
    return os.path.getsize(path)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def child(path: str, index_dir: str, seconds: float, batch: int) -> dict:
    """Runs in a fresh process: open + first batch, then batches for `seconds`."""
    from variator_jax import data, pipeline
    tok = data.load_tokenizer("byte")
    base = _rss_kb("VmRSS:")
    tic = time.perf_counter()
    it = pipeline.train_batches(f"text:{path}", "pretrain", tok, global_batch_size=batch,
                                max_input_length=224, max_target_length=32, seed=0,
                                index_dir=index_dir, prefetch=0)
    next(it)
    open_s = time.perf_counter() - tic
    tokens, batches, tic = 0, 0, time.perf_counter()
    while time.perf_counter() - tic < seconds:
        b = next(it)
        tokens += int(b["attention_mask"].sum() + b["decoder_attention_mask"].sum())
        batches += 1
    elapsed = time.perf_counter() - tic
    return {"open_s": open_s, "tokens_per_s": tokens / elapsed, "batches": batches,
            "rss_after_imports_mb": base / 1024, "peak_rss_mb": _rss_kb("VmHWM:") / 1024}


def _run_child(path, index_dir, seconds, batch) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.data", "--child", path, index_dir,
                          str(seconds), str(batch)], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_tokens_per_s(variant: str, batch: int, repeats: int) -> tuple[float, float]:
    """The plugin pre-training step at `variant` widths: -> (seconds per step, tokens/s)."""
    import jax

    from benchmarks.train_step import _batch, _measure
    from variator_jax import objectives, sharding
    from variator_jax.plugins import PluginConfig, init_plugin
    from variator_jax.t5 import T5Config, init_t5
    cfg = T5Config.variant(variant, dropout_rate=0.0)
    pcfg = PluginConfig(4)
    mesh = sharding.make_mesh(1, 1)
    backbone = jax.jit(lambda k: init_t5(k, cfg), out_shardings=sharding.replicated(mesh))(
        jax.random.key(0))
    plugin = init_plugin(jax.random.key(1), cfg, pcfg)
    batch_arrays = sharding.global_batch(mesh, _batch(cfg, batch, 224, 32),
                                         sharding.DEFAULT_RULES)
    setup = objectives.make(cfg, pcfg, "hidden", "pretrain", dropout=False)
    seconds, _ = _measure("plugin step", setup, plugin, backbone, batch_arrays, mesh, repeats)
    return seconds, batch * (224 + 32) / seconds


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000", help="Corpus sizes in MB.")
    parser.add_argument("--seconds", type=float, default=20.0, help="Timing per size.")
    parser.add_argument("--batch", type=int, default=64, help="Global batch (rows).")
    parser.add_argument("--step", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--step-variant", default="t5-base")
    parser.add_argument("--step-batch", type=int, default=4)
    parser.add_argument("--tmp", default=tempfile.gettempdir())
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
    parser.add_argument("--name", default="cpu-2c")
    args = parser.parse_args(argv)

    rows, machine = [], _machine()
    print(f"machine: {machine}; pre-training rows 224 / 32 tokens, ByT5, batch {args.batch}")
    print(f"{'corpus':>10}{'open+1st batch':>16}{'tokens/s':>12}{'RSS imports':>13}"
          f"{'peak RSS':>10}", flush=True)
    for mb in [float(s) for s in args.sizes.split(",")]:
        work = tempfile.mkdtemp(dir=args.tmp, prefix="vj-data-bench-")
        try:
            path = os.path.join(work, "corpus.txt")
            size = generate(path, mb)
            r = _run_child(path, os.path.join(work, "index"), args.seconds, args.batch)
        finally:
            shutil.rmtree(work, ignore_errors=True)  # The corpus and its index.
        r["corpus_mb"] = size / 1e6
        rows.append(r)
        print(f"{size / 1e6:>8.0f}MB{r['open_s']:>15.2f}s{r['tokens_per_s']:>12,.0f}"
              f"{r['rss_after_imports_mb']:>10.0f}MiB{r['peak_rss_mb']:>7.0f}MiB", flush=True)
    result = {"machine": machine, "batch": args.batch, "corpora": rows}
    if args.step:
        seconds, step_tps = step_tokens_per_s(args.step_variant, args.step_batch, 3)
        pipe_tps = min(r["tokens_per_s"] for r in rows)
        result.update(step_variant=args.step_variant, step_batch=args.step_batch,
                      step_seconds=seconds, step_tokens_per_s=step_tps,
                      ratio=pipe_tps / step_tps)
        print(f"{args.step_variant} plugin step (batch {args.step_batch} x 224 / 32): "
              f"{seconds:.2f} s, {step_tps:,.0f} tokens/s; pipeline (one worker, slowest "
              f"corpus) / step = {pipe_tps / step_tps:.1f}x (target >= 3)")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"data-{args.name}.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5]))))
    else:
        from variator_jax import cli
        cli.run_main(main)  # Errors, Ctrl-C, a closed pipe: one line (boundary.py).
