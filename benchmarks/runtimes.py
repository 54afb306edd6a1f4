"""The plugin's speedup on every runtime users deploy to, for the same weights.

    python -m benchmarks.runtimes                 # t5-base widths, 4 layers: see README
    python -m benchmarks.runtimes --quick         # tiny sizes, a smoke test (~1 min)

Runtimes: JAX (`model.encode`, jitted; layers unrolled unless `--scan-layers`), HF PyTorch
eager with `attach_plugin`, the same under `torch.compile`, and ONNX Runtime on the graph
`python -m variator_jax.convert onnx` writes (exported once per plugin, dynamic shapes,
checked against JAX when written). On an accelerator JAX and PyTorch run there (CUDA when
torch has it), ONNX Runtime stays on CPU and is left out unless `--dtype float32`.

For every (batch, n), all runtimes and plugins (none, k = 2/4/8) run in interleaved rounds
(`variator_jax.timing`), so load from other processes hits them alike. Per runtime: the
uncompressed time (median), its ratio to JAX's, and per k the speedup as the median of the
per-round ratios (uncompressed / compressed, same round) and its fraction of the FLOPs
ceiling `encoder_flops(n) / encoder_flops(n, k)`; and the largest relative difference of its
output to JAX's on a padded batch of the same shape (rows of several lengths). On CPU it first
calls `benchmarks.host.keep_freed_memory()`, as benchmarks.speed (`--no-keep-freed-memory`:
the platform's malloc, as the library's own commands run), and ONNX Runtime's threads do not
spin between calls, as torch's OpenMP threads (OMP_WAIT_POLICY=PASSIVE).
Results: benchmarks/results/runtimes-<machine>.{md,json}.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # As benchmarks/speed.py: before torch loads.

import jax  # noqa: E402
import numpy as np  # noqa: E402

import variator_jax as vj  # noqa: E402
from benchmarks import host, models, speed  # noqa: E402
from variator_jax import cli, onnx_export, timing  # noqa: E402
from variator_jax.flops import encoder_flops  # noqa: E402
from variator_jax.report import markdown_table  # noqa: E402

RUNTIMES = ("jax", "torch", "torch.compile", "onnx")
QUICK = dict(variant="t5-small", layers=1, batches="1,2", lengths="16", ratios="2,4",
             rounds=2)


# -- The models, one no-argument closure per (runtime, plugin) ----------------------------------
def torch_runner(model, device: str, compiled: bool):
    """(ids, mask) -> numpy [b, n, d] through an HF encoder (plugin attached, or not)."""
    import torch
    if compiled:
        # Static shapes: one graph per benchmarked shape, compiled in the warm-up call. Every
        # plugin's model runs the same HF code objects, so dynamo counts all their graphs
        # against one recompile limit (8 by default): past it, calls silently run eager.
        limit = 4 * 64  # (none, k = 2, 4, 8) x up to 64 shapes.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, limit)
        model = torch.compile(model, dynamic=False)

    def run(ids, mask):
        with torch.inference_mode():
            out = model(input_ids=torch.as_tensor(ids, dtype=torch.long, device=device),
                        attention_mask=torch.as_tensor(mask, dtype=torch.long, device=device))
            if device != "cpu":
                torch.cuda.synchronize()
        return out.last_hidden_state.float().cpu().numpy()
    return run


def build_runners(args, backbone_dir, plugin_dirs, device):
    """{(runtime, k or None): (ids, mask) -> numpy}, for the runtimes asked and available."""
    import torch
    # Unrolled by default, as an inference deployment on CPU would load it: a scanned stack
    # slices each layer's weights out of the stacked arrays on every call, and XLA:CPU copies
    # every slice (28 MB per t5-base layer in float32) before its dot. That copy costs the
    # same with a plugin as without, so it lowers the plugin's fraction of the FLOPs ceiling.
    cfg, backbone = vj.load_hf_t5(backbone_dir, dtype=args.dtype, attention=args.attention,
                                  attention_block_bytes=host.attention_block_bytes(),
                                  scan_layers=args.scan_layers)
    runners = {}
    for k, plugin_dir in plugin_dirs.items():
        plugin = None if plugin_dir is None else vj.load_plugin(plugin_dir, cfg=cfg)
        runners["jax", k] = (lambda ids, mask, p=plugin: np.asarray(
            speed.jax_encoder(cfg, backbone, ids.astype(np.int32), mask.astype(np.int32), p)(),
            np.float32))
        for runtime in ("torch", "torch.compile"):
            if runtime in args.runtimes and device is not None:
                model = onnx_export.hf_encoder(backbone_dir, plugin_dir)
                model = model.to(device=device, dtype=getattr(torch, args.dtype))
                runners[runtime, k] = torch_runner(model, device, runtime == "torch.compile")
        if "onnx" in args.runtimes and args.dtype == "float32":
            path = os.path.join(os.path.dirname(backbone_dir), f"encoder-{k}.onnx")
            onnx_export.export_encoder(backbone_dir, path, plugin_dir)
            # Not spinning, as torch's OpenMP threads (OMP_WAIT_POLICY above): a runtime's
            # threads busy-waiting after its call would slow the next one in the round.
            runners["onnx", k] = onnx_export.onnx_runner(path, args.threads, spinning=False)
    return cfg, runners


# -- One shape ----------------------------------------------------------------------------------
def measure_shape(cfg, runners, batch: int, n: int, args) -> list[dict]:
    """All runners at [batch, n], interleaved -> one row per runtime."""
    full = np.ones((batch, n), np.int64)
    ids = np.random.default_rng(n + batch).integers(2, cfg.vocab_size, (batch, n))
    check_ids, check_mask = onnx_export.check_batch(cfg.vocab_size, batch, n, seed=n + batch)
    expected = {k: runners["jax", k](check_ids, check_mask) for (rt, k) in runners if rt == "jax"}
    diffs = {key: onnx_export.relative_difference(fn(check_ids, check_mask), expected[key[1]])
             for key, fn in runners.items()}
    times = timing.interleaved_times({key: (lambda fn=fn: fn(ids, full))
                                      for key, fn in runners.items()}, args.rounds, warmup=2)
    base_flops = encoder_flops(cfg, n)["total"]
    rows = []
    for runtime in dict.fromkeys(rt for rt, _ in runners):
        off = times[runtime, None]
        row = dict(runtime=runtime, batch=batch, n=n, off_ms=1e3 * float(np.median(off)),
                   over_jax=speed.paired_ratio(off, times["jax", None]),
                   max_rel_diff=max(d for (rt, _), d in diffs.items() if rt == runtime))
        for k in args.ratios:
            flops_k = encoder_flops(cfg, n, ratio=k, bottleneck=args.bottleneck)["total"]
            ceiling = base_flops / flops_k
            stats = timing.speedup_stats(off, times[runtime, k], ceiling)
            row[f"k={k}"] = dict(stats, fraction=stats["speedup"] / ceiling)
        rows.append(row)
    return rows


def table(rows, ratios) -> str:
    headers = ["batch", "n", "runtime", "uncompressed ms", "/ JAX"]
    headers += [f"k={k} speedup (fraction)" for k in ratios] + ["max rel. diff to JAX"]
    cells = [[r["batch"], r["n"], r["runtime"], f"{r['off_ms']:.1f}", f"{r['over_jax']:.2f}"]
             + [f"{timing.format_speedup(r[f'k={k}'])} ({r[f'k={k}']['fraction']:.2f})"
                for k in ratios] + [f"{r['max_rel_diff']:.1e}"] for r in rows]
    return markdown_table(headers, cells, align="rrlrr" + "r" * len(ratios) + "r")


# -- Main ---------------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {', '.join(f'{k}={v}' for k, v in QUICK.items())}")
    p.add_argument("--variant", default="t5-base", help="widths from T5Config.variant")
    p.add_argument("--layers", type=int, default=4, help="encoder layers")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--lengths", default="128,512", help="encoder lengths n")
    p.add_argument("--ratios", default="2,4,8", help="plugin compression ratios k")
    p.add_argument("--bottleneck", type=int, default=64, help="plugin bottleneck r")
    p.add_argument("--runtimes", default=",".join(RUNTIMES),
                   help="a subset of " + ",".join(RUNTIMES))
    p.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on accelerators)")
    p.add_argument("--attention", default="auto",
                   help="JAX's T5Config.attention: auto (blocked on CPU, dense elsewhere), "
                        "dense, blocked, xla, cudnn (GPU, bfloat16)")
    p.add_argument("--scan-layers", action="store_true",
                   help="JAX's layers as one nn.scan, as training runs them (default unrolled, "
                        "per-layer weights, which spares the copy of each layer's weights)")
    p.add_argument("--rounds", type=int, default=11, help="interleaved rounds per shape")
    p.add_argument("--threads", type=int, default=None,
                   help="PyTorch and ONNX Runtime threads (default: all cores, as XLA)")
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="on CPU, benchmarks.host.keep_freed_memory() first (as benchmarks.speed)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--name", default=None, help="results file suffix (default: from the machine)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        given = {a.lstrip("-").split("=")[0] for a in (argv or sys.argv[1:])}
        for key, value in QUICK.items():
            if key not in given:
                setattr(args, key, value)
    args.runtimes = [r for r in args.runtimes.split(",") if r]
    unknown = set(args.runtimes) - set(RUNTIMES) - {"jax"}
    if unknown:
        p.error(f"--runtimes: unknown {sorted(unknown)}; known: {', '.join(RUNTIMES)}")
    args.ratios = [int(k) for k in str(args.ratios).split(",") if k]
    args.batches = [int(b) for b in str(args.batches).split(",") if b]
    args.lengths = [int(n) for n in str(args.lengths).split(",") if n]
    args.threads = args.threads or speed._cores()
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.keep_freed_memory:
        host.keep_freed_memory()
    import torch
    torch.set_num_threads(args.threads)
    device = speed.torch_device(jax.default_backend())
    scratch = tempfile.mkdtemp(prefix="runtimes-")
    try:
        # Plugins off their init (`spread`): a wrong wiring in any runtime then shows in its
        # difference to JAX.
        backbone_dir, plugin_dirs = models.random_models(
            args.variant, scratch, layers=args.layers, ratios=args.ratios,
            bottleneck=args.bottleneck, seed=args.seed, spread=0.05)
        plugin_dirs = {None: None, **plugin_dirs}
        cfg, runners = build_runners(args, backbone_dir, plugin_dirs, device)
        info = speed.machine_info(args.threads)
        rows = []
        for batch in args.batches:
            for n in args.lengths:
                tic = time.time()
                rows += measure_shape(cfg, runners, batch, n, args)
                print(f"batch {batch}, n = {n}: done in {time.time() - tic:.0f} s",
                      file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    info["load_average_end"] = speed._load_average()
    text = "\n\n".join([
        f"**Machine**: {info['cpu']}, {info['cores']} cores, JAX {info['jax']} on "
        f"{info['backend']} ({info['device']}), PyTorch {info.get('torch')} on {device} "
        f"({args.threads} threads, ONNX Runtime too); {host.malloc_setting()}. Load average "
        f"at start "
        f"{speed._fmt_load(info['load_average_start'])}, end "
        f"{speed._fmt_load(info['load_average_end'])}.",
        f"**Model**: {args.variant} widths, {cfg.num_layers} encoder layers, random weights, "
        f"{args.dtype}, JAX attention `{args.attention}`, JAX layers "
        f"{'scanned' if args.scan_layers else 'unrolled'}; plugin bottleneck r = "
        f"{args.bottleneck}; timed without padding. Speedup: "
        f"median of {args.rounds} interleaved rounds' ratios (interquartile range), fraction "
        "of the FLOPs ceiling in brackets; `/ JAX`: uncompressed time over JAX's; max rel. "
        "diff: over the plugins, on a padded batch of the same shape.",
        table(rows, args.ratios)])
    print(text)
    payload = dict(machine=info, args=vars(args), rows=rows)
    base = speed.save(args.out, args.name or speed.machine_slug(info), text, payload,
                      kind="runtimes")
    print(f"\nwrote {base}.md and {base}.json")
    return payload


if __name__ == "__main__":
    cli.run_main(main)
