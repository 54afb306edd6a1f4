"""Training objectives: what a stage trains, its loss, its eval sums, and what it exports.

The trainer holds one `Objective` and never asks which stage it runs (t5x's `BaseModel`
beside its trainer). Two trees reach every step: `params`, the trainable tree the
optimizer sees, and `frozen`, a tree the step reads but never trains (None when there is
none). Two objectives implement the stages of docs/DESIGN.md §2:

  - `Finetune` (stage 0, and LM pre-training from a random init): `params` is the whole
    backbone, the loss is the task cross-entropy; exported as an HF-format backbone.
  - `Distill` (stages 1 and 2): `frozen` is the backbone, which is also the teacher (the
    same backbone without the plugin); `params` is the plugin. The loss is the masked MSE
    of the final encoder and decoder hidden states (`loss="hidden"`), plus (`task+hidden`)
    or instead of it (`task`) the task cross-entropy; exported as a plugin directory.

Objectives are frozen dataclasses: static, so a compiled step bakes them in.
"""
from __future__ import annotations

import abc
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from variator_jax import data as data_lib
from variator_jax.convert import save_hf_t5
from variator_jax.errors import UserError, user_errors
from variator_jax.metrics import classification_metrics
from variator_jax.model import apply_forward as forward  # Un-jitted: steps jit as a whole.
from variator_jax.plugins import (
    Plugin,
    PluginConfig,
    init_plugin,
    load_plugin,
    plugin_param_count,
    save_plugin,
)
from variator_jax.plugins import logical_axes as plugin_logical_axes
from variator_jax.t5 import T5Config, frozen_in_compute_dtype, init_t5, logical_axes

LOSSES = ("hidden", "task", "task+hidden")


# -- Loss pieces ----------------------------------------------------------------------------------
def masked_mse(student, teacher, mask):
    """Mean squared error over real positions and features: [batch, len, d], mask [batch, len]."""
    w = mask.astype(jnp.float32)[..., None]
    se = jnp.sum(jnp.square(student.astype(jnp.float32) - teacher.astype(jnp.float32)) * w)
    return se / (jnp.maximum(jnp.sum(w), 1.0) * student.shape[-1])


def class_logits(objective, logits):
    """[batch, m, vocab] -> [batch, num_labels]: verbalizer logits at the first position."""
    return logits[:, 0, jnp.asarray(objective.verbalizer)]


def task_ce(objective, logits, batch, weight=None):
    """Cross-entropy: over the label words for classification, else over every real target
    token (span corruption targets, answers). -> (sum, count) for exact weighted means.
    Unlabelled classification rows (label -1, kept for the hidden-state loss) count for nothing."""
    if objective.kind == "classification":
        label = batch["label"]
        ce = optax.softmax_cross_entropy_with_integer_labels(class_logits(objective, logits),
                                                             jnp.maximum(label, 0))
        w = (label >= 0).astype(jnp.float32) * (1.0 if weight is None else weight)
        return jnp.sum(ce * w), jnp.sum(w)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    w = batch["decoder_attention_mask"].astype(jnp.float32)
    if weight is not None:
        w = w * weight[:, None]
    return jnp.sum(ce * w), jnp.sum(w)


def _inputs(batch):
    return (batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"],
            batch["decoder_attention_mask"])


def _weighted(batch):
    """-> (weight [batch] float32, the batch with padding rows (weight 0) masked out)."""
    w = batch["weight"].astype(jnp.float32)
    return w, dict(batch, attention_mask=batch["attention_mask"] * (w[:, None] > 0),
                   decoder_attention_mask=batch["decoder_attention_mask"] * (w[:, None] > 0))


# -- The interface --------------------------------------------------------------------------------
class Objective(abc.ABC):
    """What training optimises and how a run is scored and saved.

    Every implementation has `cfg` (the backbone's T5Config), `kind` (the task's kind:
    "pretrain" | "classification" | "generation"), `verbalizer` (classification: the label
    tokens whose logits at the first decoder position are the class scores) and `dropout`
    (the trained model runs with the backbone's dropout; a teacher never does).
    """
    cfg: T5Config
    kind: str
    verbalizer: tuple[int, ...] | None
    dropout: bool
    output: str  # The exported result's name in the workdir (and "{output}_dir" in result.json).
    learns_from_unlabelled = False  # Classification rows with label -1 carry a training signal.

    @abc.abstractmethod
    def init(self, rng):
        """A fresh trainable tree (`jax.eval_shape` of it gives the trainable's shapes)."""

    @abc.abstractmethod
    def logical_axes(self, shapes):
        """The trainable tree's logical axis names (`sharding.py` resolves them)."""

    @abc.abstractmethod
    def frozen(self, backbone):
        """Of the loaded `backbone`, the tree every step reads and never trains (or None)."""

    @abc.abstractmethod
    def start(self, backbone):
        """The host tree (numpy) a fresh run's trainable starts from, or None for `init`."""

    @abc.abstractmethod
    def loss_terms(self, params, frozen, batch, dropout_rng, deterministic=False):
        """-> (the loss term by term, their sum is minimised; the trained model's outputs)."""

    @abc.abstractmethod
    def eval_sums(self, params, frozen, batch) -> dict:
        """Sums over one eval batch (rows with `weight` 0 are padding and count for nothing),
        plus per-example class predictions for classification; `eval_summary` divides."""

    @abc.abstractmethod
    def export(self, directory: str, params, *, tokenizer, backbone_id: dict) -> str:
        """Writes the trained `params` (host arrays) to `directory`; -> the line to print."""

    @abc.abstractmethod
    def parameter_overview(self, backbone_count: int) -> str:
        """One line: what is trained and what is frozen, with counts."""

    def identity(self) -> dict:
        """What, beyond stage, task and backbone, must match to resume a workdir (run.json)."""
        return {}

    def _task_sums(self, logits, masked, w) -> dict:
        out = {"count": jnp.sum(w)}
        out["ce_sum"], out["ce_n"] = task_ce(self, logits, masked, w)
        if self.kind == "classification":
            out["pred"] = jnp.argmax(class_logits(self, logits), -1)
            out["label"], out["weight"] = masked["label"], w
        return out


@dataclasses.dataclass(frozen=True)
class Finetune(Objective):
    """The whole backbone trains on the task cross-entropy (stage 0; LM pre-training)."""
    cfg: T5Config
    kind: str
    verbalizer: tuple[int, ...] | None = None
    dropout: bool = True
    output = "backbone"

    def init(self, rng):
        return init_t5(rng, self.cfg)

    def logical_axes(self, shapes):
        del shapes  # The backbone's axes follow from its config.
        return logical_axes(self.cfg)

    def frozen(self, backbone):
        return None

    def start(self, backbone):
        return backbone  # A loaded backbone fine-tunes; none (a variant) starts from `init`.

    def loss_terms(self, params, frozen, batch, dropout_rng, deterministic=False):
        del frozen
        out = forward(self.cfg, params, *_inputs(batch), dropout_rng=dropout_rng,
                      deterministic=deterministic or not self.dropout)
        ce_sum, ce_n = task_ce(self, out["logits"], batch)
        return {"task_ce": ce_sum / jnp.maximum(ce_n, 1.0)}, out

    def eval_sums(self, params, frozen, batch) -> dict:
        del frozen
        w, masked = _weighted(batch)
        return self._task_sums(forward(self.cfg, params, *_inputs(masked))["logits"], masked, w)

    def export(self, directory, params, *, tokenizer, backbone_id):
        del backbone_id
        save_hf_t5(directory, self.cfg.replace(dtype="float32"), params, tokenizer=tokenizer)
        return f"Backbone written to {directory} (HF format)"

    def parameter_overview(self, backbone_count):
        return f"Parameters: backbone {backbone_count:,} (trainable, full fine-tuning)"


@dataclasses.dataclass(frozen=True)
class Distill(Objective):
    """The plugin trains; the frozen backbone without the plugin is the teacher (stages 1, 2).

    `frozen` is behind `stop_gradient`: no backbone weight gradient is ever formed.
    `init_plugin`: a plugin directory a fresh run starts from (adaptation starts from the
    pre-trained plugin, docs/DESIGN.md §2, step 2); empty: a fresh plugin.
    """
    cfg: T5Config
    pcfg: PluginConfig
    loss: str
    kind: str
    verbalizer: tuple[int, ...] | None = None
    dropout: bool = True
    init_plugin: str = ""
    output = "plugin"

    @property
    def learns_from_unlabelled(self):
        """The hidden-state loss needs no label: it distils the teacher on any input."""
        return "hidden" in self.loss

    def init(self, rng):
        return init_plugin(rng, self.cfg, self.pcfg)

    def logical_axes(self, shapes):
        # Replicated by the default rules; sharded with the backbone under FSDP.
        return plugin_logical_axes(shapes)

    def frozen(self, backbone):
        return frozen_in_compute_dtype(self.cfg, backbone)  # Placed once in bf16, if so.

    def start(self, backbone):
        del backbone
        if not self.init_plugin:
            return None
        path = self.init_plugin
        with user_errors(f"init_plugin {path}"):
            pcfg, host_plugin = load_plugin(path, cfg=self.cfg)
        if pcfg != self.pcfg:
            raise UserError(f"init_plugin {path} has ratio={pcfg.ratio}, bottleneck="
                            f"{pcfg.bottleneck}, mask_aware={pcfg.mask_aware}; the config asks "
                            f"for ratio={self.pcfg.ratio}, bottleneck={self.pcfg.bottleneck}, "
                            f"mask_aware={self.pcfg.mask_aware}")
        return jax.tree.map(np.asarray, host_plugin)

    def loss_terms(self, params, frozen, batch, dropout_rng, deterministic=False):
        backbone = jax.lax.stop_gradient(frozen)
        student = forward(self.cfg, backbone, *_inputs(batch), plugin=Plugin(self.pcfg, params),
                          dropout_rng=dropout_rng, deterministic=deterministic or not self.dropout)
        terms = {}
        if "hidden" in self.loss:
            teacher = jax.lax.stop_gradient(forward(self.cfg, backbone, *_inputs(batch)))
            terms["enc_mse"] = masked_mse(student["encoder_hidden"], teacher["encoder_hidden"],
                                          batch["attention_mask"])
            terms["dec_mse"] = masked_mse(student["decoder_hidden"], teacher["decoder_hidden"],
                                          batch["decoder_attention_mask"])
        if "task" in self.loss:
            ce_sum, ce_n = task_ce(self, student["logits"], batch)
            terms["task_ce"] = ce_sum / jnp.maximum(ce_n, 1.0)
        return terms, student

    def eval_sums(self, params, frozen, batch) -> dict:
        w, masked = _weighted(batch)
        student = forward(self.cfg, frozen, *_inputs(masked), plugin=Plugin(self.pcfg, params))
        teacher = forward(self.cfg, frozen, *_inputs(masked))
        out = self._task_sums(student["logits"], masked, w)
        for name, mask in (("enc", masked["attention_mask"]),
                           ("dec", masked["decoder_attention_mask"])):
            n = jnp.sum(mask) * self.cfg.d_model
            mse = masked_mse(student[f"{name}oder_hidden"], teacher[f"{name}oder_hidden"], mask)
            out[f"{name}_se"], out[f"{name}_n"] = mse * jnp.maximum(n, 1.0), n
        out["teacher_ce_sum"], _ = task_ce(self, teacher["logits"], masked, w)
        if self.kind == "classification":
            out["teacher_pred"] = jnp.argmax(class_logits(self, teacher["logits"]), -1)
        else:  # How often the student predicts the teacher's token.
            same = jnp.argmax(student["logits"], -1) == jnp.argmax(teacher["logits"], -1)
            out["agree_sum"] = jnp.sum(same * masked["decoder_attention_mask"])
        return out

    def export(self, directory, params, *, tokenizer, backbone_id):
        del tokenizer
        save_plugin(directory, self.pcfg, params, backbone_id=backbone_id)
        return f"Plugin written to {directory}"

    def parameter_overview(self, backbone_count):
        n = plugin_param_count(self.cfg, self.pcfg)
        return (f"Parameters: backbone {backbone_count:,} (frozen) | plugin k={self.pcfg.ratio} "
                f"r={self.pcfg.bottleneck}: {n:,} (trainable, {100 * n / backbone_count:.2f} % "
                f"of the backbone) over {self.cfg.num_layers} encoder layers")

    def identity(self) -> dict:
        return {"plugin": dict(ratio=self.pcfg.ratio, bottleneck=self.pcfg.bottleneck,
                               mask_aware=self.pcfg.mask_aware)}


def make(cfg: T5Config, pcfg: PluginConfig | None, loss: str, kind: str,
         verbalizer: tuple[int, ...] | None = None, dropout: bool = True,
         init_plugin: str = "") -> Objective:
    """The objective of a stage: no plugin config (`finetune`) trains the backbone on the
    task (`loss` is then always "task"); a plugin config distills into that plugin."""
    if pcfg is None:
        return Finetune(cfg, kind, verbalizer, dropout)
    return Distill(cfg, pcfg, loss, kind, verbalizer, dropout, init_plugin)


# -- Eval summary ---------------------------------------------------------------------------------
def eval_summary(task, sums: dict, preds: dict) -> dict[str, float]:
    """`eval_sums` outputs summed over batches (`sums`) and concatenated (`preds`) -> means:
    enc_mse, dec_mse (plugins), ce, teacher_ce, and for classification the metrics of `task`
    (a `data.Task`, a task name or a task file; GLUE's for the GLUE tasks) of
    the student (and `teacher_*`, and student/teacher `agreement`, with a plugin; for other
    tasks `agreement` is the share of target positions where their argmax tokens agree)."""
    out = {}
    for name in ("enc", "dec"):
        if f"{name}_se" in sums:
            out[f"{name}_mse"] = sums[f"{name}_se"] / max(sums[f"{name}_n"], 1.0)
    out["ce"] = sums["ce_sum"] / max(sums["ce_n"], 1.0)
    if "teacher_ce_sum" in sums:
        out["teacher_ce"] = sums["teacher_ce_sum"] / max(sums["ce_n"], 1.0)
    if "agree_sum" in sums:  # Span corruption / generation: token-level agreement.
        out["agreement"] = sums["agree_sum"] / max(sums["ce_n"], 1.0)
    if "pred" in preds:
        names = data_lib.get_task(task).metrics
        real = preds["weight"] > 0
        out.update(classification_metrics(names, preds["pred"][real], preds["label"][real]))
        if "teacher_pred" in preds:
            teacher = classification_metrics(names, preds["teacher_pred"][real],
                                             preds["label"][real])
            out.update({f"teacher_{k}": v for k, v in teacher.items()})
            out["agreement"] = float(np.mean(preds["pred"][real] == preds["teacher_pred"][real]))
    return out
