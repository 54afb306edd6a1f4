"""Encoder speed: compressed vs uncompressed against the FLOPs ceiling, and JAX vs PyTorch.

    python -m benchmarks.speed                    # t5-base widths, 2 layers, batch 1: ~2 min
    python -m benchmarks.speed --layers 4 --batch 4 --lengths 256,512 --ratios 4
    python -m benchmarks.speed --dtype bfloat16   # on an accelerator (adds MFU)

Model: the widths of `--variant` (t5-base: d_model 768, d_ff 3072, 12 heads, so the FFN
dominates as in the real model) with `--layers` encoder layers, random weights; the speed of
a layer does not depend on the weights, and per-layer ratios do not depend on the depth.

Five tables (see benchmarks/README.md for every column):
  1. the jitted `variator_jax.model.encode` with a k = 2/4/8 plugin vs without, as measured
     speedup and as a fraction of the analytic ceiling
     `encoder_flops(cfg, n)["total"] / encoder_flops(cfg, n, ratio=k)["total"]`
     (issue 3's target: >= 0.9 at n >= 256 on CPU);
  2. the uncompressed JAX encoder vs HF transformers' PyTorch T5 encoder, same weights (via
     `save_hf_t5` -> `from_pretrained`), batch and threads (target: JAX at least as fast);
     on an accelerator also model FLOPs utilisation;
  3. one layer's attention block and FFN block (plain and with each plugin) timed alone, with
     their FLOP rates: where the gap between measured speedup and ceiling comes from;
  4. the frozen FFN alone at n and ceil(n/k) rows, in JAX and PyTorch, and the plugin's
     merge + expand alone against its analytic share: the matmul rate at the sizes
     compression leaves;
  5. the plugin's largest matmul (x @ W_i^x, [batch*n, d] x [d, r]) alone in both frameworks.
On CPU it first calls `benchmarks.host.keep_freed_memory()` (`--no-keep-freed-memory` to
compare glibc's defaults).
Every variant of one length runs interleaved, round after round, in a fresh random order each
round (`variator_jax.timing`), so load from other processes hits them alike; times are
medians over rounds and ratios are medians of the per-round ratios.
Results: benchmarks/results/speed-<machine>.{md,json}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import tempfile
import time

# PyTorch's OpenMP threads spin-wait between parallel regions by default; on a machine whose
# cores other processes also use, a spinning thread that loses its core stalls every region
# (measured here: the 2-layer encoder at n = 256 went from ~100 ms to ~630 ms). Sleeping waits
# give PyTorch its best time, so the comparison below is the conservative one. Must be set
# before torch (libgomp) loads; an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import variator_jax as vj  # noqa: E402
from benchmarks import host  # noqa: E402
from variator_jax import (
    cli,  # noqa: E402
    stacking,  # noqa: E402
    t5,  # noqa: E402
    timing,  # noqa: E402
)
from variator_jax import plugins as plugins_lib  # noqa: E402
from variator_jax.flops import encoder_flops  # noqa: E402
from variator_jax.model import encode  # noqa: E402
from variator_jax.report import markdown_table  # noqa: E402

TARGET_FRACTION, TARGET_FROM_N = 0.9, 256  # Issue 3: >= 0.9 of the ceiling at n >= 256 (CPU).

# Dense peak FLOP/s per chip by compute dtype (float32 matmuls run as TF32 on NVIDIA tensor
# cores under JAX's default precision). Matched against `device_kind`; --peak-tflops overrides.
PEAK_TFLOPS = {
    "H200": {"bfloat16": 989, "float32": 494}, "H100": {"bfloat16": 989, "float32": 494},
    "A100": {"bfloat16": 312, "float32": 156}, "L4": {"bfloat16": 121, "float32": 60},
    "TPU v4": {"bfloat16": 275}, "TPU v5 lite": {"bfloat16": 197}, "TPU v5e": {"bfloat16": 197},
    "TPU v5p": {"bfloat16": 459}, "TPU v6 lite": {"bfloat16": 918}, "TPU v6e": {"bfloat16": 918},
}


# -- Machine --------------------------------------------------------------------------------------
def machine_info(torch_threads: int | None) -> dict:
    """What the numbers were measured on: CPU model, cores, backend, devices, versions."""
    from variator_jax.evaluators.speed import cpu_model
    cpu = cpu_model()
    import flax
    info = dict(cpu=cpu, cores=_cores(), backend=jax.default_backend(),
                device=jax.devices()[0].device_kind, device_count=jax.device_count(),
                jax=jax.__version__, flax=flax.__version__, python=platform.python_version(),
                xla_flags=os.environ.get("XLA_FLAGS", ""), torch_threads=torch_threads,
                malloc=host.malloc_setting(),
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                date=datetime.datetime.now().isoformat(timespec="seconds"))
    info["load_average_start"] = _load_average()
    try:
        import torch
        import transformers
        info.update(torch=torch.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    return info


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _load_average():
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine_slug(info: dict) -> str:
    """A file-name-safe name: the device off CPU, else the CPU model and core count."""
    if info["backend"] != "cpu":
        name = f"{info['backend']}-{info['device']}"
    else:
        model = re.sub(r"\(.*?\)|processor|cpu|[0-9]+-core", "", info["cpu"], flags=re.I)
        name = f"cpu-{model}-{info['cores']}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def peak_flops(info: dict, dtype: str, override_tflops: float | None) -> float | None:
    """--peak-tflops (any backend), else the table for a known accelerator, else None."""
    if override_tflops:
        return override_tflops * 1e12
    if info["backend"] == "cpu":
        return None
    for name, peaks in PEAK_TFLOPS.items():
        if name.lower() in info["device"].lower() and dtype in peaks:
            return peaks[dtype] * 1e12
    return None


# -- Timing ---------------------------------------------------------------------------------------
def paired_ratio(num: np.ndarray, den: np.ndarray) -> float:
    """Median over rounds of num/den, each pair measured in the same round."""
    return float(np.median(num / den))


# -- The two models -------------------------------------------------------------------------------
def jax_encoder(cfg, backbone, ids, mask, plugin=None):
    """A no-argument closure running the jitted encoder to completion."""
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    return lambda: encode(cfg, backbone, ids, mask, plugin).block_until_ready()


def torch_encoder(cfg, backbone, threads: int, device: str):
    """HF T5 encoder with the same weights (save_hf_t5 -> from_pretrained) -> (factory, info).

    The factory maps (ids, mask) to a no-argument closure running the encoder to completion
    under `torch.inference_mode()`, in the benchmark's compute dtype. `factory.ffn` is the
    first layer's FFN module (`T5DenseActDense`), for table 4."""
    import torch
    from transformers import T5ForConditionalGeneration
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as path:
        vj.save_hf_t5(path, cfg, backbone)
        model = T5ForConditionalGeneration.from_pretrained(path)
    model = model.to(device=device, dtype=getattr(torch, cfg.dtype)).eval()
    encoder = model.get_encoder()

    def factory(ids, mask):
        ids_t = torch.as_tensor(ids, dtype=torch.long, device=device)
        mask_t = torch.as_tensor(mask, dtype=torch.long, device=device)

        def run():
            with torch.inference_mode():
                out = encoder(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
            if device != "cpu":
                torch.cuda.synchronize()
            return out
        return run
    factory.ffn = encoder.block[0].layer[1].DenseReluDense  # Same weights as JAX's block_0.
    return factory, dict(attn_implementation=getattr(model.config, "_attn_implementation", None),
                         device=device, threads=torch.get_num_threads())


# -- One sequence length --------------------------------------------------------------------------
def measure_length(cfg, backbone, plugins, n, args, torch_factory, peak):
    """All variants at length n, interleaved -> (compression rows, framework row)."""
    rng = np.random.default_rng(n)
    ids = rng.integers(2, cfg.vocab_size, (args.batch, n)).astype(np.int32)
    mask = np.ones((args.batch, n), np.int32)
    fns = {"off": jax_encoder(cfg, backbone, ids, mask)}
    fns.update({f"k={k}": jax_encoder(cfg, backbone, ids, mask, p) for k, p in plugins.items()})
    check = None
    if torch_factory is not None:
        fns["torch"] = torch_factory(ids, mask)
        check = float(np.max(np.abs(np.asarray(encode(cfg, backbone, ids, mask))
                                    - fns["torch"]().float().cpu().numpy())))
    times = timing.interleaved_times(fns, args.repeats, warmup=2)
    t_off, base_flops = times["off"], encoder_flops(cfg, n)["total"]
    rows = []
    for k in plugins:
        ceiling = base_flops / encoder_flops(cfg, n, ratio=plugins[k][0])["total"]
        speedup = paired_ratio(t_off, times[f"k={k}"])
        fraction = speedup / ceiling
        rows.append(dict(n=n, ratio=k, off_ms=1e3 * np.median(t_off),
                         compressed_ms=1e3 * np.median(times[f"k={k}"]), speedup=speedup,
                         ceiling=ceiling, fraction=fraction,
                         target=None if n < TARGET_FROM_N else fraction >= TARGET_FRACTION))
    frame = dict(n=n, jax_ms=1e3 * np.median(t_off), gflops=args.batch * base_flops / 1e9)
    if torch_factory is not None:
        frame.update(torch_ms=1e3 * np.median(times["torch"]), max_abs_diff=check,
                     jax_over_torch=paired_ratio(t_off, times["torch"]))
    if peak:
        frame["mfu"] = args.batch * base_flops / np.median(t_off) / peak
    return rows, frame, {name: (1e3 * t).round(3).tolist() for name, t in times.items()}


# -- Where the time goes: one layer's two blocks ---------------------------------------------------
def _first_layer(params):
    """Layer 0 of plugin params stacked over layers."""
    return jax.tree.map(lambda x: x[0], params)


def layer_blocks(cfg, backbone, plugins, n, batch, torch_ffn=None):
    """Jitted closures for one encoder layer's attention block and FFN block (plain and with
    each plugin), on the same hidden states -> ({name: fn}, {name: analytic FLOPs}).

    Also the frozen FFN alone (no norm, residual or plugin) on `rows` = n and ceil(n/k)
    vectors per example, as "ffn alone {rows}" and, with `torch_ffn` (HF's module holding the
    same weights), "torch ffn alone {rows}": the matmul rate at the sizes compression leaves."""
    layer = stacking.layer(backbone["encoder"], 0)
    attn = layer["layer_0"]
    h = jax.random.normal(jax.random.key(1), (batch, n, cfg.d_model), jnp.dtype(cfg.dtype))
    mask = jnp.ones((batch, n), jnp.int32)
    # Position bias as a later layer receives it from block 0 (computed once per forward).
    offsets = jax.random.normal(jax.random.key(2), (cfg.num_heads, 2 * n - 1))
    bias = t5.ToeplitzBias(t5._mask_bias(mask), offsets)
    run_attn = jax.jit(lambda p, h, bias: t5.LayerSelfAttention(cfg).apply(
        {"params": p}, h, bias)[0])
    run_ffn = jax.jit(lambda p, h, m, plugin: t5.LayerFF(cfg, plugin and plugin[0]).apply(
        {"params": p}, h, m, plugin and plugin[1]))
    fns = {"attention": lambda: run_attn(attn, h, bias).block_until_ready(),
           "ffn": lambda: run_ffn(layer["layer_1"], h, mask, None).block_until_ready()}
    one = encoder_flops(cfg.replace(num_layers=1), n)
    flops = {"attention": batch * (one["attention_proj"] + one["attention_scores"]),
             "ffn": batch * one["ffn"]}
    for k, (pcfg, params) in plugins.items():
        layer_plugin = (pcfg, _first_layer(params))
        fns[f"ffn k={k}"] = (lambda lp=layer_plugin: run_ffn(layer["layer_1"], h, mask, lp)
                             .block_until_ready())
        comp = encoder_flops(cfg.replace(num_layers=1), n, ratio=pcfg)
        flops[f"ffn k={k}"] = batch * (comp["ffn"] + comp["plugin"])
    run_ffn_alone = jax.jit(lambda p, x: t5.DenseReluDense(cfg).apply({"params": p}, x))
    ffn_params = layer["layer_1"]["DenseReluDense"]
    for k in [1, *plugins]:
        rows = -(-n // k)
        x = h[:, :rows]
        fns[f"ffn alone {rows}"] = (lambda x=x: run_ffn_alone(ffn_params, x).block_until_ready())
        flops[f"ffn alone {rows}"] = batch * encoder_flops(cfg.replace(num_layers=1), rows)["ffn"]
        if torch_ffn is not None:
            fns[f"torch ffn alone {rows}"] = _torch_closure(torch_ffn, torch_ffn, x)
            flops[f"torch ffn alone {rows}"] = flops[f"ffn alone {rows}"]
    # The plugin's two halves alone, on n padded to a multiple of k (as compressed_ffn does).
    run_merge, run_expand = jax.jit(plugins_lib.merge), jax.jit(plugins_lib.expand)
    for k, (pcfg, params) in plugins.items():
        pad = -n % pcfg.ratio
        x = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        m = jnp.pad(mask, ((0, 0), (0, pad)))
        y = x[:, :x.shape[1] // pcfg.ratio]
        first = _first_layer(params)
        fns[f"merge k={k}"] = (lambda x=x, m=m, p=first, c=pcfg:
                               run_merge(x, m, p, c).block_until_ready())
        fns[f"expand k={k}"] = (lambda y=y, x=x, p=first, c=pcfg:
                                run_expand(y, x, p, c).block_until_ready())
        flops[f"merge k={k}"] = flops[f"expand k={k}"] = 0  # Reported as times only.
    # The plugin's largest matmul, x @ W_i^x ([batch*n, d] x [d, r]), in both frameworks.
    if plugins:
        pcfg, params = next(iter(plugins.values()))
        w = _first_layer(params)["decompress"]["wi"]["kernel"][cfg.d_model:]
        fns["x @ W_i^x"] = lambda w=w: _matmul(h, w).block_until_ready()
        flops["x @ W_i^x"] = 2 * batch * n * cfg.d_model * pcfg.bottleneck
        if torch_ffn is not None:
            import torch
            fns["torch x @ W_i^x"] = _torch_closure(torch.matmul, torch_ffn, h, w)
            flops["torch x @ W_i^x"] = flops["x @ W_i^x"]
    return fns, flops


_matmul = jax.jit(jnp.matmul)


def _torch_closure(fn, like, *arrays):
    """A no-argument closure running `fn` on `arrays` (JAX or NumPy), copied once to the device
    and dtype of the module `like`, to completion."""
    import torch
    param = next(like.parameters())
    tensors = [torch.tensor(np.array(a), device=param.device, dtype=param.dtype) for a in arrays]

    def run():
        with torch.inference_mode():
            out = fn(*tensors)
        if param.device.type != "cpu":
            torch.cuda.synchronize()
        return out
    return run


def measure_blocks(cfg, backbone, plugins, n, args, torch_ffn=None) -> dict:
    """Median ms and GFLOP/s of each block of one layer at length n (interleaved rounds)."""
    fns, flops = layer_blocks(cfg, backbone, plugins, n, args.batch, torch_ffn)
    times = timing.interleaved_times(fns, args.repeats, warmup=2)
    return {"n": n, **{name: dict(ms=1e3 * float(np.median(t)),
                                  gflops_per_s=flops[name] / float(np.median(t)) / 1e9)
                       for name, t in times.items()}}


def blocks_table(blocks) -> str:
    names = [key for key in blocks[0] if key.startswith(("attention", "ffn"))
             and "alone" not in key]
    rows = [[b["n"], *(f"{b[name]['ms']:.1f} ({b[name]['gflops_per_s']:.0f})" for name in names)]
            for b in blocks]
    return markdown_table(["n", *(f"{name} block ms (GFLOP/s)" for name in names)], rows,
                          align="r" * (1 + len(names)))


def plugin_costs(blocks, plugins, cfg, batch) -> list[dict]:
    """Table 4 rows from the block timings: per n and k, the frozen FFN alone at ceil(n/k)
    rows (JAX, PyTorch) and the plugin's own time (`plugins.merge` + `plugins.expand`, each
    jitted and timed alone), against its analytic FLOPs at the rate of the FFN alone at n rows.
    """
    rows = []
    for b in blocks:
        n = b["n"]
        full = b[f"ffn alone {n}"]
        for k in [1, *plugins]:
            m = -(-n // k)
            alone = b[f"ffn alone {m}"]
            row = dict(n=n, ratio=k, rows=batch * m, jax_ms=alone["ms"],
                       jax_gflops_per_s=alone["gflops_per_s"],
                       jax_rate_vs_full=alone["gflops_per_s"] / full["gflops_per_s"])
            if f"torch ffn alone {m}" in b:
                t_alone, t_full = b[f"torch ffn alone {m}"], b[f"torch ffn alone {n}"]
                row.update(torch_ms=t_alone["ms"], torch_gflops_per_s=t_alone["gflops_per_s"],
                           torch_rate_vs_full=t_alone["gflops_per_s"] / t_full["gflops_per_s"])
            if k > 1:
                analytic = batch * encoder_flops(cfg.replace(num_layers=1), n,
                                                 ratio=plugins[k][0])["plugin"]
                row.update(plugin_ms=b[f"merge k={k}"]["ms"] + b[f"expand k={k}"]["ms"],
                           plugin_ms_at_ffn_rate=1e3 * analytic / (1e9 * full["gflops_per_s"]))
            rows.append(row)
    return rows


def thin_matmul_table(blocks) -> str:
    """Table 5: the plugin's largest matmul alone, JAX vs PyTorch (GFLOP/s)."""
    has_torch = "torch x @ W_i^x" in blocks[0]
    headers = ["n", "JAX ms (GFLOP/s)"] + (["PyTorch ms (GFLOP/s)"] if has_torch else [])
    rows = [[b["n"], *(f"{b[name]['ms']:.3f} ({b[name]['gflops_per_s']:.0f})"
                       for name in ("x @ W_i^x", "torch x @ W_i^x") if name in b)]
            for b in blocks]
    return markdown_table(headers, rows, align="r" * len(headers))


def plugin_costs_table(rows) -> str:
    has_torch = "torch_ms" in rows[0]
    headers = (["n", "k", "FFN rows", "JAX FFN alone ms (GFLOP/s)", "JAX rate vs k = 1"]
               + (["PyTorch FFN alone ms (GFLOP/s)", "PyTorch rate vs k = 1"] if has_torch else [])
               + ["plugin ms", "plugin ms at the k = 1 FFN's rate"])
    table = []
    for r in rows:
        cells = [str(r["n"]), str(r["ratio"]), str(r["rows"]),
                 f"{r['jax_ms']:.2f} ({r['jax_gflops_per_s']:.0f})", f"{r['jax_rate_vs_full']:.2f}"]
        if has_torch:
            cells += [f"{r['torch_ms']:.2f} ({r['torch_gflops_per_s']:.0f})",
                      f"{r['torch_rate_vs_full']:.2f}"]
        cells += ([f"{r['plugin_ms']:.2f}", f"{r['plugin_ms_at_ffn_rate']:.2f}"]
                  if "plugin_ms" in r else ["-", "-"])
        table.append(cells)
    return markdown_table(headers, table, align="r" * len(headers))


# -- Report ---------------------------------------------------------------------------------------
def compression_table(rows) -> str:
    mark = {None: "-", True: "yes", False: "**no**"}
    table = [[r["n"], r["ratio"], f"{r['off_ms']:.1f}", f"{r['compressed_ms']:.1f}",
              f"{r['speedup']:.2f}x", f"{r['ceiling']:.2f}x", f"{r['fraction']:.2f}",
              mark[r["target"]]] for r in rows]
    return markdown_table(["n", "k", "uncompressed ms", "compressed ms", "speedup",
                           "FLOPs ceiling", "fraction of ceiling", "target (>= 0.9, n >= 256)"],
                          table, align="rrrrrrrc")


def framework_table(frames) -> str:
    has_torch, has_mfu = "torch_ms" in frames[0], "mfu" in frames[0]
    headers = (["n", "encoder GFLOPs", "JAX ms"]
               + (["PyTorch ms", "JAX / PyTorch", "max abs diff"] if has_torch else [])
               + (["MFU"] if has_mfu else []))
    table = []
    for f in frames:
        cells = [str(f["n"]), f"{f['gflops']:.1f}", f"{f['jax_ms']:.1f}"]
        if has_torch:
            cells += [f"{f['torch_ms']:.1f}", f"{f['jax_over_torch']:.2f}",
                      f"{f['max_abs_diff']:.1e}"]
        if has_mfu:
            cells.append(f"{100 * f['mfu']:.1f} %")
        table.append(cells)
    return markdown_table(headers, table, align="r" * len(headers))


def header(info, cfg, args) -> str:
    """The machine and model lines above the tables."""
    torch_part = "PyTorch: skipped"
    if info.get("torch_threads"):
        torch_part = (f"PyTorch {info['torch']} ({info['torch_threads']} threads, "
                      f"OMP_WAIT_POLICY={info['omp_wait_policy']}, attention "
                      f"`{info.get('torch_attn')}`)")
    return (f"**Machine**: {info['cpu']}, {info['cores']} cores; JAX {info['jax']} on "
            f"{info['backend']} ({info['device']}, XLA's own thread pool over all cores); "
            f"{torch_part}. XLA_FLAGS=`{info['xla_flags'] or '(none)'}`; {info['malloc']}. "
            f"Load average at start {_fmt_load(info['load_average_start'])}, "
            f"end {_fmt_load(info.get('load_average_end'))}.\n\n"
            f"**Model**: {args.variant} widths (d_model {cfg.d_model}, d_ff {cfg.d_ff}, "
            f"{cfg.num_heads} heads x d_kv {cfg.d_kv}, {cfg.feed_forward_proj}), "
            f"{cfg.num_layers} encoder layers, random weights, {cfg.dtype}; batch {args.batch}, "
            f"no padding; plugin bottleneck r = {args.bottleneck}. Medians of {args.repeats} "
            f"interleaved rounds ({info['date']}).")


def _fmt_load(load):
    return "n/a" if not load else "/".join(f"{x:.1f}" for x in load)


def save(out_dir, slug, text, payload, kind="speed"):
    """Writes `text` (Markdown) and `payload` (JSON) to `out_dir`, both named KIND-SLUG plus
    their suffix -> that path, sans suffix."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"{kind}-{slug}")
    with open(base + ".md", "w") as f:
        f.write(text + "\n")
    with open(base + ".json", "w") as f:
        json.dump(payload, f, indent=2, default=float)
    return base


# -- Main -----------------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="t5-base", help="widths from T5Config.variant")
    p.add_argument("--layers", type=int, default=2,
                   help="encoder layers (the cost per layer is what counts)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--lengths", default="128,256,512,1024", help="encoder lengths n")
    p.add_argument("--ratios", default="2,4,8", help="plugin compression ratios k")
    p.add_argument("--bottleneck", type=int, default=64, help="plugin bottleneck r")
    p.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on accelerators)")
    p.add_argument("--repeats", type=int, default=11, help="interleaved rounds per length")
    p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True,
                   help="compare with HF PyTorch T5 (CPU when JAX is on CPU, else CUDA if present)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: the cores XLA uses, all of them)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s for MFU (default: a table of accelerators; none on CPU)")
    p.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                   help="also time one layer's blocks, the FFN, the plugin and its largest "
                        "matmul alone (tables 3-5)")
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="on CPU, benchmarks.host.keep_freed_memory(): "
                        "temporaries over 32 MiB then do not page-fault on every call")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--name", default=None, help="results file suffix (default: from the machine)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def torch_device(backend: str) -> str | None:
    """Compare like with like: CPU with CPU, a GPU with CUDA; None when that is not available."""
    if backend == "cpu":
        return "cpu"
    try:
        import torch
        return "cuda" if backend == "gpu" and torch.cuda.is_available() else None
    except ImportError:
        return None


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.keep_freed_memory:
        host.keep_freed_memory()
    cfg = vj.T5Config.variant(args.variant, num_layers=args.layers, num_decoder_layers=1,
                              attention_block_bytes=host.attention_block_bytes(), dtype=args.dtype)
    backbone = vj.init_t5(jax.random.key(args.seed), cfg)
    ratios = [int(k) for k in args.ratios.split(",") if k]
    plugins = {k: (vj.PluginConfig(ratio=k, bottleneck=args.bottleneck),
                   vj.init_plugin(jax.random.key(args.seed + k), cfg,
                                  vj.PluginConfig(ratio=k, bottleneck=args.bottleneck)))
               for k in ratios}
    device = torch_device(jax.default_backend()) if args.torch else None
    threads = args.threads or _cores()
    factory, torch_info = torch_encoder(cfg, backbone, threads, device) if device else (None, {})
    info = machine_info(torch_info.get("threads"))
    info["torch_attn"] = torch_info.get("attn_implementation")
    peak = peak_flops(info, args.dtype, args.peak_tflops)
    rows, frames, blocks, raw = [], [], [], {}
    for n in [int(x) for x in args.lengths.split(",") if x]:
        tic = time.time()
        r, f, raw[n] = measure_length(cfg, backbone, plugins, n, args, factory, peak)
        rows += r
        frames.append(f)
        if args.breakdown:
            blocks.append(measure_blocks(cfg, backbone, plugins, n, args,
                                         getattr(factory, "ffn", None)))
        print(f"n = {n}: done in {time.time() - tic:.0f} s", file=sys.stderr, flush=True)
    info["load_average_end"] = _load_average()
    sections = [header(info, cfg, args), "Compressed vs uncompressed encoder (JAX):",
                compression_table(rows), "Uncompressed encoder, JAX vs PyTorch"
                + (" and model FLOPs utilisation" if peak else "") + ":", framework_table(frames)]
    if blocks:
        costs = plugin_costs(blocks, plugins, cfg, args.batch)
        sections += ["Where the time goes: one encoder layer's blocks alone (JAX; pre-norm and "
                     "residual included; FLOP rate = analytic FLOPs / time):", blocks_table(blocks),
                     "The frozen FFN alone at the sizes compression gives it (rows = batch x "
                     "ceil(n/k)), and the plugin's own time (see benchmarks/README.md):",
                     plugin_costs_table(costs)]
        if "x @ W_i^x" in blocks[0]:
            sections += [f"The plugin's largest matmul alone, x @ W_i^x ([batch x n, "
                         f"{cfg.d_model}] x [{cfg.d_model}, {args.bottleneck}]):",
                         thin_matmul_table(blocks)]
    text = "\n\n".join(sections)
    print(text)
    payload = dict(machine=info, args=vars(args), config=dict(d_model=cfg.d_model, d_ff=cfg.d_ff,
                   num_heads=cfg.num_heads, d_kv=cfg.d_kv, num_layers=cfg.num_layers,
                   feed_forward_proj=cfg.feed_forward_proj, dtype=cfg.dtype),
                   peak_flops=peak, compression=rows, frameworks=frames, blocks=blocks,
                   plugin_costs=costs if blocks else [],
                   raw_ms=raw)
    base = save(args.out, args.name or machine_slug(info), text, payload)
    print(f"\nwrote {base}.md and {base}.json")
    return payload


if __name__ == "__main__":
    cli.run_main(main)  # Bad input: one line, not a traceback.
