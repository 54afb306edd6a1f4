r"""The paper's stage chain (docs/DESIGN.md §2) as one cached, resumable command.

Task accuracy against compression ratio, against training-free baselines, with the paper's
ablations (Variator, Findings of EMNLP 2023, §4):

  python -m variator_jax.stages --preset=demo   # `make demo`: k = 4 only, a few minutes
  python -m variator_jax.stages                 # `make reproduce`: k = 2, 4, 8 and ablations

Both print their own time estimate first. With no download at all it builds the whole
pipeline on CPython's own text:

  (a) lm         a small T5 pre-trained from scratch by span corruption (half of the tokens
                 masked, in spans of 3 on average) on CPython's documentation
                 (`builtin:pydoc`) and the training split's and unlabeled docstrings, with a
                 4,000-piece subword vocabulary trained on the same text (vocab.py;
                 `--tokenizer=byte` takes ByT5's bytes instead); its held-out cross-entropy
                 and sample outputs are reported;
  (b) finetune   stage 0: the whole backbone fine-tuned on `builtin:stdlib_docs` (which
                 package a standard-library docstring comes from; 8 labels);
  (c) pretrain   stage 1 for each k: a plugin distilled on the frozen (a) by span corruption;
  (d) adapt      stage 2 for each k: that plugin adapted on the frozen (b), hidden-state MSE,
                 on the task's training inputs and the standard library's other docstrings
                 (`--adapt_split=train+unlabeled`: the loss needs no label; see below);
                 ablations (default at k = 4): no stage 1 (fresh plugin), and `task+hidden` loss;
  (e) eval       on the test split, through `evaluate.evaluate`: the teacher, every plugin,
                 and the training-free compressors (mean pooling, ToMe, strided) at every k.

Every stage is a `train_and_evaluate` run in its own directory under --workdir (WORKDIR/lm,
WORKDIR/finetune/backbone, WORKDIR/pretrain-k4, WORKDIR/adapt-k4/plugin, ...): a finished
stage is skipped (its result.json), an interrupted one resumes from its last checkpoint, so
running the command again finishes what an earlier run began. Each stage's training time,
summed over the invocations that ran it, is kept in WORKDIR/stage_seconds.json
(`pipeline_seconds`).

The full-size version is the same command pointed at a real T5 and a real task, e.g.

  python -m variator_jax.stages --backbone=/models/t5-base --task=sst2 \
      --data=tfds:glue/sst2 --test_split=validation --corpus=text:/data/wiki.txt \
      --size=base --preset=paper

(--backbone skips (a); --preset=paper takes the released settings of configs/*.py instead
of the miniature's.) Writes quality-<task>-<machine>.json, .md and .png to --out
(quality_report.py).
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from variator_jax import configs, overlap, pipeline, splits, train, vocab
from variator_jax import data as data_lib
from variator_jax import evaluate as eval_lib
from variator_jax.convert import load_hf_t5
from variator_jax.errors import UserError, user_errors
from variator_jax.fileio import atomic_write, write_json, write_text
from variator_jax.model import apply_forward, forward, generate, shift_right
from variator_jax.plugins import init_plugin, load_plugin
from variator_jax.quality_report import write
from variator_jax.t5 import T5Config, init_t5

# The miniature (docs/DESIGN.md §5): the whole pipeline took about 37 min on 2 shared CPU cores.
# A byte-level first try (n = 128 bytes, 600 + 400 steps) left the LM at the unigram plateau
# (held-out CE 2.46 per byte) and the teacher at 31.9 % validation accuracy, where a
# bag-of-words logistic regression reaches 79 %: subwords let the tiny model see words.
# (a) masks half of the tokens (`noise`: density 0.5, mean span 3, UL2's "X-denoiser", Tay et
# al. 2022), not T5's 15 %: with T5's setting the miniature LM's decoder barely read its
# encoder on the task's docstrings (validation CE 5.13 with the real encoder inputs, 5.17 with
# another example's; short texts understate it, benchmarks/README.md), and
# fine-tuning started from it reached 58 % validation accuracy against 80 % from a random
# init; with this one, 79 % (issue 12; 1,000 LM + 500 fine-tuning steps, dropout off).
# (a)'s corpus and (d) also read the task's `unlabeled` docstrings: on the 1,235 training
# docstrings alone stage 2 overfitted (k = 4, validation: 73.6 % alone, 76.9 % with them).
# The plugin's bottleneck is 16, d_model / 8, near the paper's proportion (64 at T5-base's 768):
# 64 here is 4.4 % of the backbone and saves 37 % of the encoder FLOPs at k = 4, 16 is 1.4 %
# and saves 45 %, for about a point of validation accuracy (k = 4: 76.9 / 75.3 %).
# Stage 2 runs at 1e-2 at k = 4 and 1e-3 at k = 2 and 8 (`adapt_lr_at`), chosen on validation:
# at k = 4, 1e-3 gave 75.3 / 73.1 / 75.8 / 74.2 % over four seeds and 1e-2 gave 78.0-79.7 % in
# three runs; at k = 2 and 8, 1e-2 was 1-4 points below 1e-3 (benchmarks/README.md).
MODEL = dict(d_model=128, d_kv=32, num_heads=4, d_ff=384, num_layers=4, num_decoder_layers=2,
             relative_attention_max_distance=64)
MINI = dict(n=64, target=64, vocab=4000, lm_steps=2000, lm_lr=2e-3, lm_weight_decay=0.1,
            noise=(0.5, 3.0), ft_steps=1500, ft_lr=1e-3, pretrain_steps=300, pretrain_lr=1e-3,
            adapt_steps=800, adapt_lr=1e-3, adapt_lr_at={4: 1e-2}, batch=32, bottleneck=16)
# For the tests: a model and step counts that only prove the pipeline runs end to end.
TINY_MODEL = dict(d_model=16, d_kv=4, num_heads=4, d_ff=32, num_layers=2, num_decoder_layers=1,
                  relative_attention_max_distance=16)
# `make demo`: the same pipeline at k = 4 only, no ablations, fewer steps (~10 min on 2 cores).
DEMO = dict(MINI, lm_steps=250, ft_steps=450, pretrain_steps=150, adapt_steps=300)
TINY = dict(n=32, target=16, vocab=600, lm_steps=2, lm_lr=1e-3, lm_weight_decay=0.1,
            noise=(0.5, 3.0), ft_steps=2, ft_lr=1e-3,
            pretrain_steps=2, pretrain_lr=1e-3, adapt_steps=2, adapt_lr=1e-3, batch=4,
            bottleneck=8)
BASELINES = ("mean_pool", "tome", "strided")


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m variator_jax.stages",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="", help="where every stage runs (cached, "
                   "resumable); default quality_workdir, demo_workdir for --preset=demo")
    p.add_argument("--out", default="", help="directory for quality-<task>-<machine>.json/.md/"
                   ".png; default WORKDIR/results (`make reproduce`: benchmarks/results)")
    p.add_argument("--backbone", default="", help="a pre-trained HF T5 dir: skips (a)")
    p.add_argument("--tokenizer", default="", help="tokenizer dir or 'byte' (default: the "
                   "backbone's; for the miniature, a vocabulary trained into WORKDIR/tokenizer)")
    p.add_argument("--size", default="",
                   help="expected variant size of --backbone (base, large...)")
    p.add_argument("--task", default="stdlib_docs", help="a task name (data.TASKS) or a JSON "
                   "task file (variator_jax/task_file.py)")
    p.add_argument("--data", default="builtin:stdlib_docs",
                   help="task source: its named splits (tfds, builtin), a jsonl:DIR of train/"
                   "validation/test[/unlabeled].jsonl, a jsonl file's per-row 'split' field, or "
                   "else a hash of each row's text (70/10/20 %%), or an hf:PATH dataset "
                   "(variator_jax/splits.py)")
    p.add_argument("--train_split", default="train", help="split of --data that (b) trains on")
    p.add_argument("--validation_split", default="validation",
                   help="split of --data that (b) validates on")
    p.add_argument("--test_split", default="test", help="split of --data that (e) reports")
    p.add_argument("--adapt_split", default="", help="split of --data that (d) trains on; "
                   "label -1 rows serve its hidden-state loss (default: train+unlabeled for "
                   "builtin:stdlib_docs and a jsonl:DIR with unlabeled.jsonl, else train)")
    p.add_argument("--corpus", default="", help="pre-training corpus for (a) and (c) "
                   "(default: CPython's docs + the task's training texts, written to WORKDIR)")
    p.add_argument("--ratios", default=None,
                   help="compression ratios k (default 2,4,8; demo: 4)")
    p.add_argument("--ablation_ratios", default=None,
                   help="k at which the ablations run (default 4; demo: none)")
    p.add_argument("--preset", choices=("mini", "demo", "tiny", "paper"), default="mini",
                   help="mini: the miniature; demo: a shorter one at k = 4; tiny: seconds, for "
                   "tests; paper: the configs' released settings")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every stage's steps")
    p.add_argument("--finetune_lr", type=float, default=None, help="(b)'s peak learning rate "
                   "(default: the preset's, 1e-3 for the miniature's d_model 128; a wider "
                   "--backbone from a random init wants less: 5e-4 at d_model 512 in "
                   "benchmarks/README.md)")
    p.add_argument("--eval_batch", type=int, default=64, help="eval and timing batch")
    p.add_argument("--speed_repeats", type=int, default=7, help="timed rounds per model")
    args = p.parse_args(argv)
    demo = args.preset == "demo"
    args.ratios = args.ratios if args.ratios is not None else "4" if demo else "2,4,8"
    args.ablation_ratios = (args.ablation_ratios if args.ablation_ratios is not None
                            else "" if demo else "4")
    args.adapt_split = args.adapt_split or ("train+unlabeled" if _has_unlabeled(args.data)
                                            else args.train_split)
    # Relative to where it runs (the checkout's root under `make`), not to the package: an
    # installed library has no checkout to write into.
    args.workdir = args.workdir or ("demo_workdir" if demo else "quality_workdir")
    args.out = args.out or os.path.join(args.workdir, "results")
    return args


def _has_unlabeled(spec: str) -> bool:
    """Whether --data has an `unlabeled` split (label -1 rows for (d)'s hidden-state loss)."""
    scheme, target, _ = data_lib.parse_source(spec)
    return spec == "builtin:stdlib_docs" or (scheme == "jsonl" and
                                             "unlabeled" in splits.split_files(target))


# == Configs of the stages =========================================================================
class Pipeline:
    """The stage chain over one workdir (`_parse`'s args): each stage's config, its cached
    run in WORKDIR/<stage>, the held-out check and time estimate before it, the evaluation
    and the reports after it. `run()` -> the results that quality_report.write takes."""

    def __init__(self, args):
        self.args = args
        self.tiny = args.preset == "tiny"
        self.mini = {"mini": MINI, "demo": DEMO, "tiny": TINY}.get(args.preset)
        self.workdir = os.path.abspath(args.workdir)
        self.ratios = [int(k) for k in args.ratios.split(",") if k]
        self.ablation_ratios = [int(k) for k in args.ablation_ratios.split(",") if k]
        self.tokenizer = args.tokenizer or None

    def path(self, *parts):
        return os.path.join(self.workdir, *parts)

    def _common(self, c, steps, lr):
        """Settings every stage shares: tokenizer, lengths, batch, steps, one CPU device."""
        if self.tokenizer:
            c.tokenizer = self.tokenizer
        if self.args.size:
            c.variant = f"t5-{self.args.size}" if "-" not in self.args.size else self.args.size
        c.seed = 0
        if self.mini is None:  # The paper preset: the configs' released settings.
            return c
        m = self.mini
        c.max_input_length = m["n"]
        c.batch_size = m["batch"]
        c.eval_batch_size = self.args.eval_batch
        c.total_steps = max(int(steps * self.args.scale), 1)
        c.lr = lr
        c.warmup_steps = min(50, max(c.total_steps // 10, 1))
        c.log_every = max(min(50, c.total_steps), 1)
        c.checkpoint_every = max(min(100, c.total_steps), 1)
        c.keep_checkpoints = 1
        c.mesh.data, c.mesh.model = 1, 1  # 2 CPU cores: one device, no communication.
        c.scan_layers = False  # 4 + 2 layers compile fast unrolled, and run faster on CPU.
        return c

    @functools.cached_property
    def _documents(self) -> list[str]:
        """CPython's docs and the task's training inputs, unlabelled ones included
        (--adapt_split): the corpus of (a) and its vocabulary."""
        docs = [e["text"] for e in data_lib.read_source("builtin:pydoc")]
        task = data_lib.get_task(self.args.task)
        docs += [task.format(e)[0]
                 for e in data_lib.read_source(self.args.data, self.args.adapt_split)]
        return [d.replace("\n\n", "\n") for d in docs]

    def corpus(self) -> str:
        """The pre-training corpus spec; the default is written once into WORKDIR."""
        if self.args.corpus:
            return self.args.corpus
        path = self.path("corpus.txt")
        if not os.path.isfile(path):
            docs = self._documents[:40] if self.tiny else self._documents
            os.makedirs(self.workdir, exist_ok=True)
            atomic_write(self.workdir, "corpus.txt",
                         lambda tmp: write_text(tmp, "\n\n".join(docs) + "\n"))
        return f"text:{path}"

    def vocabulary(self) -> str:
        """(a)'s tokenizer: --tokenizer, or a subword vocabulary trained once into WORKDIR."""
        if self.tokenizer:
            return self.tokenizer
        path = self.path("tokenizer")
        if not os.path.isfile(os.path.join(path, "tokenizer.json")):
            vocab.train_tokenizer(self._documents, self.mini["vocab"], path + ".tmp")
            os.replace(path + ".tmp", path)
        return path

    def lm_config(self):
        c = configs.get_config("finetune", "task=pretrain")
        c = self._common(c, self.mini["lm_steps"], self.mini["lm_lr"])
        c.tokenizer = self.vocabulary()  # Saved beside the backbone: later stages find it there.
        c.variant = "t5-v1_1-small"  # Layout (gated-GELU, untied head); sizes from MODEL.
        c.model_overrides.update(TINY_MODEL if self.tiny else MODEL)
        c.data.train = c.data.eval = self.corpus()
        c.data.train_split, c.data.eval_split = "train[:97%]", "train[97%:]"
        self._span_corruption(c)
        c.weight_decay = self.mini["lm_weight_decay"]
        c.dropout = False  # As T5 v1.1 pre-trained (HF's t5-v1_1 model card); (b) turns it on.
        return c

    def _span_corruption(self, c):
        """(a)'s and (c)'s span corruption: the miniature's target length and noise."""
        c.max_target_length = self.mini["target"]
        c.data.noise_density, c.data.mean_noise_span_length = self.mini["noise"]

    def finetune_config(self, backbone):
        c = configs.get_config("finetune", f"task={self.args.task}")
        c = self._common(c, self.mini and self.mini["ft_steps"], self.mini and self.mini["ft_lr"])
        if self.args.finetune_lr is not None:
            c.lr = self.args.finetune_lr
        c.backbone = backbone
        c.eval_every = 250 if self.mini is MINI else 0  # The validation curve, in metrics.jsonl.
        self._task_data(c)
        return c

    def _task_data(self, c):
        c.data.train, c.data.eval = self.args.data, self.args.data
        c.data.train_split, c.data.eval_split = self.args.train_split, self.args.validation_split
        if self.mini is not None:
            c.max_target_length = 4  # Classification reads one decoder position.

    def plugin_config(self, stage, backbone, k, **kw):
        arg = f"stage={stage},ratio={k}" + (f",task={self.args.task}" if stage == "adapt" else "")
        c = configs.get_config("plugin", arg)
        steps = self.mini and self.mini[f"{stage}_steps"]
        lr = self.mini and self.mini.get(f"{stage}_lr_at", {}).get(k, self.mini[f"{stage}_lr"])
        c = self._common(c, steps, lr)
        c.backbone = backbone
        if stage == "pretrain":
            c.data.train, c.data.eval = self.corpus(), ""
            c.data.train_split = "train[:97%]"
            if self.mini is not None:
                self._span_corruption(c)
        else:
            self._task_data(c)
            c.data.train_split = self.args.adapt_split
        if self.mini is not None:
            c.plugin.bottleneck = self.mini["bottleneck"]
        for key, value in kw.items():
            setattr(c, key, value)
        return c

    # == Stages ====================================================================================
    def stage(self, name, config) -> dict:
        """`train.py`'s run of one stage in WORKDIR/NAME (skipped when finished), its wall
        time added to WORKDIR/stage_seconds.json: a run resumed over several invocations
        counts every part, and a finished one is not timed again."""
        finished = os.path.isfile(self.path(name, "result.json"))  # Then train.py skips it.
        t0 = time.time()
        out = train.train_and_evaluate(config, self.path(name))
        if not finished:
            seconds = self.stage_seconds()
            seconds[name] = round(seconds.get(name, 0) + time.time() - t0, 1)
            write_json(self.workdir, "stage_seconds.json", seconds, indent=1)
        return out

    def stage_seconds(self) -> dict:
        path = self.path("stage_seconds.json")
        if not os.path.isfile(path):
            return {}
        with open(path) as f:
            return json.load(f)

    def check_held_out(self) -> dict:
        """No validation or test text in a training split or the pre-training corpus
        (`variator_jax.overlap`; raises a one-line UserError). -> every split's size and
        the overlap count (0), for the results."""
        a = self.args
        task = data_lib.get_task(a.task)
        with user_errors(f"--data {a.data}"):
            read = {split: data_lib.read_source(a.data, split) for split in
                    dict.fromkeys((a.train_split, a.adapt_split, a.validation_split, a.test_split))}
            corpus = data_lib.read_source(self.corpus(), "all")
            trained = {split: overlap.input_hashes(task, read[split])
                       for split in (a.train_split, a.adapt_split)}
            documents = overlap.document_hashes(corpus)
            found = 0
            for held in dict.fromkeys((a.validation_split, a.test_split)):
                checks = [(overlap.overlapping(task, read[held], hashes), f"training split {split}")
                          for split, hashes in trained.items()]
                checks.append((overlap.overlapping(task, read[held], documents, fields=True),
                               f"the pre-training corpus {self.corpus()}"))
                for texts, training in checks:
                    overlap.refuse(texts, f"{a.data} {held}", training)
                    found += len(texts)
        roles = (("train", a.train_split), ("adapt", a.adapt_split),
                 ("validation", a.validation_split), ("test", a.test_split))
        return dict(source=a.data,
                    task_file=a.task if task.origin.startswith("task file") else None,
                    splits={role: dict(split=split, examples=len(read[split]))
                            for role, split in roles},
                    corpus=dict(source=self.corpus(), documents=len(corpus)), overlap=found)

    # == The time it will take ==================================================================
    def steps_to_train(self) -> dict:
        """{stage: optimizer steps} of the stages `run` has yet to train (finished ones skip)."""
        stages = {} if self.args.backbone else {"lm": self.lm_config()}
        stages["finetune"] = self.finetune_config("")
        for k in self.ratios:
            stages[f"pretrain-k{k}"] = self.plugin_config("pretrain", "", k)
            stages[f"adapt-k{k}"] = self.plugin_config("adapt", "", k)
        for k in self.ablation_ratios:
            stages[f"adapt-k{k}-no-pretrain"] = stages[f"adapt-k{k}-task-loss"] = \
                self.plugin_config("adapt", "", k)
        return {name: c.total_steps for name, c in stages.items()
                if not os.path.isfile(self.path(name, "result.json"))}

    def measure_step(self, repeats: int = 3) -> tuple[float, float]:
        """(compile seconds, seconds a step) of a full fine-tuning step (AdamW) of this run's
        model at stage (b)'s batch and lengths, on this machine now: stage (a)/(b) steps cost
        about this, plugin steps (teacher forward, plugin-only backward) less."""
        c = self.finetune_config("")
        if self.args.backbone:
            cfg = T5Config.from_hf(os.path.join(self.args.backbone, "config.json"),
                                   scan_layers=False)
        else:
            cfg = T5Config.variant("t5-v1_1-small", scan_layers=False,
                                   **(TINY_MODEL if self.tiny else MODEL),
                                   vocab_size=self.mini["vocab"])
        ids = jnp.ones((c.batch_size, c.max_input_length), jnp.int32)
        targets = jnp.ones((c.batch_size, c.max_target_length), jnp.int32)
        tx = optax.adamw(1e-3)

        def step(params, opt_state):
            def loss(p):
                logits = apply_forward(cfg, p, ids, jnp.ones_like(ids),
                                       shift_right(targets))["logits"]
                return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
            updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        params = init_t5(jax.random.key(0), cfg)
        state = (params, tx.init(params))
        step = jax.jit(step, donate_argnums=(0, 1))
        t0 = time.perf_counter()
        state = jax.block_until_ready(step(*state))
        t1 = time.perf_counter()
        for _ in range(repeats):
            state = step(*state)
        jax.block_until_ready(state)
        return t1 - t0, (time.perf_counter() - t1) / repeats

    def estimate(self) -> dict:
        """The training time still ahead, from the preset's steps and a step measured now;
        printed before stage (a) and kept in the results beside the time it really took."""
        steps = self.steps_to_train()
        if not steps:
            return {}
        compile_s, step_s = self.measure_step()
        # Each stage compiles a train step and an eval step: two compiles a stage.
        seconds = sum(steps.values()) * step_s + 2 * len(steps) * compile_s
        print(f"Estimate: about {seconds / 60:.0f} min of training for {len(steps)} stage(s) "
              f"({sum(steps.values()):,} steps at {1e3 * step_s:.0f} ms, measured just now on "
              f"this machine as it is loaded, plus two compiles of ~{compile_s:.0f} s each), "
              f"then evaluation; stages finished earlier are skipped.", flush=True)
        return dict(train_seconds=round(seconds), step_seconds=step_s,
                    compile_seconds=round(compile_s, 1), steps=steps)

    def run(self):
        stages = []
        if self.mini is None and not self.args.backbone:
            raise UserError("--preset=paper needs --backbone: a pre-trained T5 directory")
        data_report = self.check_held_out()  # Before anything trains.
        estimate = self.estimate()

        def stage(name, config):
            stages.append(name)
            return self.stage(name, config)

        if self.args.backbone:
            lm_dir, lm = self.args.backbone, None
        else:
            lm = stage("lm", self.lm_config())
            lm_dir = lm["backbone_dir"]
        ft = stage("finetune", self.finetune_config(lm_dir))
        ft_dir = ft["backbone_dir"]
        plugins = {}
        for k in self.ratios:
            pre = stage(f"pretrain-k{k}", self.plugin_config("pretrain", lm_dir, k))
            plugins[("variator", k)] = stage(f"adapt-k{k}", self.plugin_config(
                "adapt", ft_dir, k, init_plugin=pre["plugin_dir"]))["plugin_dir"]
        for k in self.ablation_ratios:
            plugins[("variator_no_pretrain", k)] = stage(
                f"adapt-k{k}-no-pretrain", self.plugin_config("adapt", ft_dir, k))["plugin_dir"]
            plugins[("variator_task_loss", k)] = stage(f"adapt-k{k}-task-loss", self.plugin_config(
                "adapt", ft_dir, k, loss="task+hidden",
                init_plugin=self.path(f"pretrain-k{k}", "plugin")))["plugin_dir"]
        for name in BASELINES:
            for k in self.ratios:
                plugins[(name, k)] = f"{name}:{k}"
        seconds = self.stage_seconds()
        results = self.evaluate(ft_dir, plugins)
        results["lm"] = self.lm_report(lm, lm_dir) if lm else {"backbone": lm_dir}
        k = 4 if 4 in self.ratios else self.ratios[0]
        results["examples"] = self.examples_report(ft_dir, plugins[("variator", k)], k)
        results["by_length"] = self.length_report(ft_dir, plugins)
        results["finetune_validation"] = ft.get("eval", {})
        results["data"] = data_report
        results["estimate"] = estimate  # Against pipeline_seconds: how honest it was.
        # Training summed over every invocation that ran a part of it (stage_seconds.json);
        # stages finished before that file existed are listed, not guessed.
        results["pipeline_seconds"] = {"train": round(sum(seconds.get(name, 0) for name in stages)),
                                       "eval": results.pop("_eval_seconds"),
                                       "stages": {name: seconds.get(name) for name in stages}}
        return results

    def evaluate(self, ft_dir, plugins):
        c = self.plugin_config("adapt", ft_dir, self.ratios[0])
        c.data.eval_split = self.args.test_split
        c.eval.speed_repeats = self.args.speed_repeats
        c.eval_batch_size = self.args.eval_batch
        t0 = time.time()
        keys = list(plugins)
        out = eval_lib.evaluate(c, self.path("eval"), [plugins[key] for key in keys])
        task = data_lib.get_task(self.args.task)
        test = data_lib.read_source(self.args.data, self.args.test_split)
        counts = collections.Counter(task.label_index(e) for e in test)
        rows = []
        for (method, k), entry in zip([("teacher", 1)] + keys, out["entries"], strict=True):
            rows.append(dict(method=method, k=k, accuracy=entry["quality"],
                             encoder_flops_saved=entry["encoder_flops_saving"],
                             speedup=entry["speedup"], params=entry["plugin_params"],
                             **{key: entry[key] for key in ("speedup_q25", "speedup_q75",
                                                            "speedup_ceiling", "above_ceiling")},
                             params_pct=entry["plugin_params_pct"]))
        return dict(task=task.name, num_classes=len(task.labels or []),
                    chance=max(counts.values()) / len(test), test_examples=len(test),
                    quality_metric=out["quality_metric"], machine=out["machine"],
                    max_input_length=c.max_input_length, python=sys.version.split()[0],
                    rows=rows, _eval_seconds=round(time.time() - t0))

    def lm_report(self, lm, lm_dir, count=3):
        """(a)'s held-out span-corruption cross-entropy and a few greedy completions."""
        cfg, backbone = load_hf_t5(lm_dir)
        tok = data_lib.load_tokenizer(self.vocabulary(), lm_dir)
        texts = self._texts(self.args.validation_split)[:count]
        rng = np.random.default_rng(0)

        def decode(ids):
            return tok.decode([int(t) for t in ids if t > 0], skip_special_tokens=False)

        samples = []
        for text in texts:
            inputs, targets = self._corrupted(tok, text, rng)
            out = generate(cfg, backbone, jnp.asarray(inputs)[None],
                           jnp.ones((1, inputs.size), jnp.int32),
                           max_new_tokens=int(targets.size) + 4)
            samples.append(dict(input=decode(inputs), target=decode(targets),
                                output=decode(np.asarray(out[0]))))
        return dict(backbone=lm_dir, eval=lm.get("eval", {}), samples=samples,
                    encoder_use=self.encoder_use(cfg, backbone, tok),
                    encoder_use_held_out=self.encoder_use_held_out(cfg, backbone, tok))

    def _texts(self, split) -> list[str]:
        """The texts of a split of --data: each row's "text", else its formatted input."""
        task = data_lib.get_task(self.args.task)
        return [e["text"] if isinstance(e.get("text"), str) else task.format(e)[0]
                for e in data_lib.read_source(self.args.data, split)]

    def _corrupted(self, tok, text, rng):
        """One validation text, span-corrupted as (a) was trained: (inputs, targets)."""
        ids = tok(text, add_special_tokens=False)["input_ids"][: self.mini["n"] - 8]
        ids = np.asarray(ids, np.int32)
        return data_lib.span_corruption(ids, rng, *self.mini["noise"],
                                        data_lib.sentinel_ids(tok, 64), tok.eos_token_id)

    def encoder_use(self, cfg, backbone, tok, count=128):
        """Does (a)'s decoder read its encoder? Span-corruption CE on validation texts with the
        real encoder inputs, and with each example's encoder input swapped for the next one's.
        A gap near 0 means an unconditional decoder, a poor start for fine-tuning (issue 12)."""
        texts = self._texts(self.args.validation_split)[:count]
        n, m = self.mini["n"], self.mini["target"] + 8
        rng = np.random.default_rng(0)
        inputs = np.zeros((len(texts), n), np.int32)
        targets = np.zeros((len(texts), m), np.int32)
        for row, text in enumerate(texts):
            i, t = self._corrupted(tok, text, rng)
            inputs[row, :min(i.size, n)], targets[row, :min(t.size, m)] = i[:n], t[:m]
        return _swap_gap(cfg, backbone, inputs, targets, shift=1)

    def encoder_use_held_out(self, cfg, backbone, tok, count=256):
        """The same question on (a)'s own held-out rows (the batches of its `eval.ce`), with
        each row's encoder input swapped for the one half the rows away: neighbouring rows
        continue the same text, and the task's short docstrings leave the decoder little to
        read, so `encoder_use` alone understates it (benchmarks/README.md)."""
        c = self.lm_config()
        rows = pipeline.eval_batches(c.data.eval, "pretrain", tok, global_batch_size=count,
                                     max_input_length=c.max_input_length,
                                     max_target_length=c.max_target_length, seed=c.seed,
                                     split=c.data.eval_split, noise=self.mini["noise"])
        batch = next(iter(rows))
        real = np.asarray(batch["weight"]) > 0
        inputs, targets = (np.asarray(batch[key])[real] for key in ("input_ids", "labels"))
        return dict(rows=int(len(inputs)),
                    **_swap_gap(cfg, backbone, inputs, targets, shift=len(inputs) // 2))

    def _input_length(self, ft_dir) -> int:
        """n as (e) evaluates: the miniature's, or the task's released length (configs)."""
        return self.plugin_config("adapt", ft_dir, self.ratios[0]).max_input_length

    def _classified(self, ft_dir, entries, examples):
        """Each entry's predicted label index for `examples` (classification): the teacher
        (None), a plugin directory or a training-free compressor ('tome:4'), fed as evaluation
        feeds them. -> (input lengths in tokens, EOS included, after truncation; [predictions])."""
        task = data_lib.get_task(self.args.task)
        cfg, backbone = load_hf_t5(ft_dir)
        tok = data_lib.load_tokenizer(self.tokenizer, ft_dir)
        verbalizer = task.verbalizer_ids(tok)
        n = self._input_length(ft_dir)
        ids = np.zeros((len(examples), n), np.int32)
        for row, e in enumerate(examples):
            # As the eval batches encode it.
            x = data_lib.encode_text(tok, task.format(e)[0], n, tok.eos_token_id)
            ids[row, : len(x)] = x
        mask = np.asarray(ids > 0, np.int32)

        def load(entry):
            spec = entry and eval_lib.compressor_spec(entry)
            if spec:
                return spec, init_plugin(None, cfg, spec)
            return entry and load_plugin(entry, cfg=cfg, backbone=backbone)

        def answer(plugin):
            out, b = [], self.args.eval_batch
            for i in range(0, len(examples), b):
                rows = slice(i, i + b)
                logits = forward(cfg, backbone, jnp.asarray(ids[rows]), jnp.asarray(mask[rows]),
                                 jnp.zeros((len(ids[rows]), 1), jnp.int32),
                                 plugin=plugin)["logits"]
                out.append(np.asarray(logits[:, 0][:, verbalizer]).argmax(-1))
            return np.concatenate(out)

        return mask.sum(1), [answer(load(entry)) for entry in entries]

    def examples_report(self, ft_dir, plugin_dir, k, count=6):
        """A few test examples with the teacher's and the k plugin's answers (classification)."""
        task = data_lib.get_task(self.args.task)
        if task.kind != "classification":
            return []
        examples = data_lib.read_source(self.args.data, self.args.test_split)[:count]
        _, (teacher, student) = self._classified(ft_dir, [None, plugin_dir], examples)

        def text(e):  # The first text field: a task file names its own.
            return next(v for key, v in e.items() if key != "label" and isinstance(v, str))

        return [dict(text=text(e)[:100], label=task.labels[task.label_index(e)],
                     teacher=task.labels[t], **{f"k{k}": task.labels[p]})
                for e, t, p in zip(examples, teacher, student, strict=True)]

    def length_report(self, ft_dir, plugins):
        """Test accuracy of every row by input length (classification): a few long inputs
        and many short ones behave differently under merging, the paper's inputs being long
        (96-512 tokens). Bins of the input length n: up to n/4, n/2 and n tokens."""
        task = data_lib.get_task(self.args.task)
        if task.kind != "classification":
            return {}
        examples = data_lib.read_source(self.args.data, self.args.test_split)
        keys = [("teacher", 1)] + list(plugins)
        lengths, answers = self._classified(
            ft_dir, [None] + [plugins[key] for key in keys[1:]], examples)
        gold = np.asarray([task.label_index(e) for e in examples])
        n = self._input_length(ft_dir)
        edges = list(zip([0, n // 4, n // 2], [n // 4, n // 2, n], strict=True))
        bins = [(lengths > lo) & (lengths <= hi) for lo, hi in edges]

        def accuracy(right, b):
            return float(right[b].mean()) if b.any() else None

        return dict(split=self.args.test_split, bins=[f"{lo + 1}-{hi}" for lo, hi in edges],
                    examples=[int(b.sum()) for b in bins],
                    rows=[dict(method=m, k=k, accuracy=[accuracy(a == gold, b) for b in bins])
                          for (m, k), a in zip(keys, answers, strict=True)])


def _swap_gap(cfg, backbone, inputs, targets, shift: int) -> dict:
    """Span-corruption CE of `targets` (0 = padding) with the real encoder `inputs`, and with
    each row's inputs taken from the row `shift` rows on: how much the decoder reads its encoder.
    Unrounded: a barely trained model's gap is a few 1e-5 nats, and not zero."""

    def ce(enc_ids):
        logits = forward(cfg, backbone, jnp.asarray(enc_ids), jnp.asarray(enc_ids > 0, jnp.int32),
                            shift_right(jnp.asarray(targets)))["logits"]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
        return float((nll * (targets > 0)).sum() / (targets > 0).sum())

    real, swapped = ce(inputs), ce(np.roll(inputs, shift, axis=0))
    return dict(ce=real, ce_swapped_encoder=swapped, gap=swapped - real)


def main(argv=None):
    """`python -m variator_jax.stages`: every stage not yet finished, then the results."""
    args = _parse(argv)
    try:
        results = Pipeline(args).run()
    except UserError as e:
        sys.exit(f"error: {e}")
    write(results, args.out)


if __name__ == "__main__":
    from variator_jax import cli  # Here: the boundary is the entry point's, not the library's.

    cli.run_main(main)  # Bad input: one line, not a traceback.
