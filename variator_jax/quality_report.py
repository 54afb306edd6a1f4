"""The stage chain's results (stages.py) as files and printed tables for a person.

quality-<task>-<machine>.json (every figure), .md (the tables) and .png (accuracy against
encoder FLOPs saved), and what `python -m variator_jax.stages` prints at the end.
"""
from __future__ import annotations

import collections
import os
import re

from variator_jax import timing
from variator_jax.fileio import atomic_write, write_json, write_text
from variator_jax.report import markdown_table


def machine_slug(machine: str) -> str:
    """'AMD EPYC 7B13, 2 cores, cpu (jax 0.10.2)' -> 'cpu-amd-epyc-7b13-2c'."""
    model = machine.split(",")[0].lower()
    cores = re.search(r"(\d+) cores", machine)
    backend = "cpu" if ", cpu" in machine else "accel"
    slug = re.sub(r"[^a-z0-9]+", "-", model).strip("-")
    return f"{backend}-{slug}" + (f"-{cores.group(1)}c" if cores else "")


def _encoder_use_lines(lm: dict) -> list[str]:
    """How much (a)'s decoder reads its encoder, on validation texts and on its own rows."""
    lines = []
    if lm.get("encoder_use"):
        use = lm["encoder_use"]
        lines += [f"  validation CE {use['ce']:.3f}, with another example's encoder input "
                  f"{use['ce_swapped_encoder']:.3f}: the decoder reads its encoder for "
                  f"{use['gap']:.3f} nats"]
    if lm.get("encoder_use_held_out"):
        use = lm["encoder_use_held_out"]
        lines += [f"  on {use['rows']} held-out corpus rows: CE {use['ce']:.3f}, with the "
                  f"encoder input of a row half the rows away {use['ce_swapped_encoder']:.3f} "
                  f"({use['gap']:.3f} nats)"]
    return lines


def format_examples(results: dict) -> str:
    """(a)'s completions and a few classified test examples, for a person to read."""
    lines = []
    lm = results.get("lm", {})
    if lm.get("samples"):
        ce = lm["eval"].get("ce", float("nan"))
        lines += [f"(a) pre-trained LM, held-out span-corruption CE {ce:.3f}:"]
        for sample in lm["samples"]:
            lines += [f"  input : {sample['input']}", f"  target: {sample['target']}",
                      f"  output: {sample['output']}"]
        lines += _encoder_use_lines(lm)
    if results.get("examples"):
        key = next(k for k in results["examples"][0] if k.startswith("k") and k[1:].isdigit())
        lines += ["", f"Test examples: gold label / teacher / plugin {key.replace('k', 'k=')}:"]
        for e in results["examples"]:
            lines.append(f"  {e['label']:>15} / {e['teacher']:<15} / {e[key]:<15} "
                         f"{e['text'][:60]!r}")
    return "\n".join(lines)


def _length_table(by: dict) -> list[str]:
    """Accuracy by input length, each plugin's bins beside the teacher's."""
    def cell(a, t):
        if a is None:
            return ""
        return f"{100 * a:.1f} %" + ("" if t is None else f" ({100 * (a - t):+.1f})")

    teacher = by["rows"][0]["accuracy"]
    rows = [[r["method"], r["k"]] + [cell(a, None if i == 0 else t)
                                     for a, t in zip(r["accuracy"], teacher, strict=True)]
            for i, r in enumerate(by["rows"])]
    header = [f"{b} tokens: {c} examples" for b, c in zip(by["bins"], by["examples"], strict=True)]
    return ["", f"{by['split'].capitalize()} accuracy by input length (tokens, EOS included; "
            "in brackets: vs the teacher):", "",
            markdown_table(["method", "k"] + header, rows, align="lr" + "r" * len(by["bins"]))]


def format_table(results: dict) -> str:
    """The results' Markdown: accuracy, FLOPs saved, speedup and size of every method."""
    lines = [f"Task `{results['task']}` ({results['num_classes']} classes, "
             f"{results['test_examples']} test examples, majority class "
             f"{100 * results['chance']:.1f} %), n = {results['max_input_length']}; measured on "
             f"{results['machine']}.", ""]
    teacher = results["rows"][0]["accuracy"]
    rows = [[r["method"], r["k"], f"{100 * r['accuracy']:.1f} %",
             "" if r["method"] == "teacher" else f"{100 * (r['accuracy'] - teacher):+.1f}",
             f"{100 * r['encoder_flops_saved']:.1f} %", timing.format_speedup(r),
             f"{r['params']:,} ({r['params_pct']:.2f} %)"] for r in results["rows"]]
    lines.append(markdown_table(["method", "k", "accuracy", "vs teacher", "encoder FLOPs saved",
                                 "speedup (IQR)", "params (% of backbone)"], rows,
                                align="lrrrrrr"))
    if results.get("by_length"):
        lines += _length_table(results["by_length"])
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    """Accuracy against encoder FLOPs saved: one line per method, the teacher as a star."""
    # matplotlib loads here, not with the module: only the final plot needs it, and it takes
    # a second or two to import.
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    teacher = results["rows"][0]
    by_method = collections.defaultdict(list)
    for r in results["rows"][1:]:
        by_method[r["method"]].append(r)
    for i, (method, rows) in enumerate(by_method.items()):
        rows = sorted(rows, key=lambda r: r["encoder_flops_saved"])
        xs = [100 * r["encoder_flops_saved"] for r in rows]
        ys = [100 * r["accuracy"] for r in rows]
        ax.plot(xs, ys, "o-" if len(rows) > 1 else "s", color=f"C{i}", label=method)
        for r, x, y in zip(rows, xs, ys, strict=True):
            ax.annotate(f"k={r['k']}", (x, y), textcoords="offset points", xytext=(4, 3),
                        fontsize=7)
    ax.plot([0], [100 * teacher["accuracy"]], "k*", markersize=12, label="teacher")
    ax.axhline(100 * results["chance"], color="grey", ls=":", lw=1, label="majority class")
    ax.set_xlabel("encoder FLOPs saved (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{results['task']}: accuracy vs compression")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.margins(x=0.08, y=0.08)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(results: dict, out_dir: str) -> str:
    """Writes OUT_DIR/quality-<task>-<machine>.{json,md,png}, prints the examples and the
    table; -> the files' common stem."""
    os.makedirs(out_dir, exist_ok=True)
    # Named by task: a run on another task never overwrites the committed results.
    stem = f"quality-{results['task']}-{machine_slug(results['machine'])}"
    table = format_table(results)
    write_json(out_dir, f"{stem}.json", results)
    atomic_write(out_dir, f"{stem}.md", lambda tmp: write_text(tmp, table + "\n"))
    plot(results, os.path.join(out_dir, f"{stem}.png"))
    print(format_examples(results))
    print()
    print(table)
    print(f"Results written to {os.path.join(out_dir, stem)}.json, .md, .png")
    return os.path.join(out_dir, stem)
