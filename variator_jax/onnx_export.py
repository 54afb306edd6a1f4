"""ONNX export of the encoder, with or without a plugin: `python -m variator_jax.convert onnx`.

The graph is HF's PyTorch T5 encoder (`transformers.T5EncoderModel`) with the plugin
patched in by `torch_plugin.attach_plugin`, traced by `torch.onnx.export`'s dynamo exporter
(`torch.export`): its symbolic shapes keep the padding to a multiple of k, the mask-aware
merge and the group reshapes valid for every length, where TorchScript tracing would bake
the traced length's padding into the graph.

    inputs  input_ids, attention_mask   [batch, n] int64 (batch and n dynamic)
    output  last_hidden_state           [batch, n, d_model] float32

The encoder is the part a plugin accelerates (docs/DESIGN.md §1); the decoder can stay in
PyTorch. Before anything is written, ONNX Runtime runs the graph on a padded batch of another
shape than the traced one and the output is compared with JAX's `model.encode` on the same
weights and plugin; above the tolerance (relative: max |onnx - jax| / max |jax|) the file is
not written. A plugin trained on another backbone (other sizes, or a recorded fingerprint
that differs from this backbone's) is refused: its output would be poor, not wrong in shape.

Reading never runs code (safetensors and JSON; .bin only through weights-only loading).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import tempfile
import warnings

import numpy as np

from variator_jax.errors import UserError

INPUTS = ("input_ids", "attention_mask")
OUTPUT = "last_hidden_state"
TOLERANCE = 1e-3  # Relative; float32 reorderings between runtimes stay near 1e-6.


class ExportError(ValueError):
    """The exported graph disagrees with JAX (the message gives the relative difference)."""


# -- The PyTorch model -------------------------------------------------------------------------
def hf_encoder(backbone_dir: str, plugin_dir: str | None = None):
    """HF `T5EncoderModel` of `backbone_dir`, float32, eval mode, with the plugin attached.

    The backbone is read by HF's own loader, independently of `load_hf_t5`, so that the JAX
    comparison checks the reading as well as the graph.
    """
    import torch
    import transformers

    from variator_jax import torch_plugin
    model = transformers.T5EncoderModel.from_pretrained(backbone_dir, dtype=torch.float32).eval()
    if plugin_dir is not None:
        torch_plugin.attach_plugin(model, plugin_dir)
    return model


def _wrapped(model):
    """`model` as a module of (input_ids, attention_mask) -> last_hidden_state [b, n, d]."""
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return Encoder().eval()


# -- What the written graph is checked against ---------------------------------------------------
def check_batch(vocab_size: int, batch: int, n: int, seed: int = 0):
    """([batch, n] int64 ids, [batch, n] int64 mask): row 0 full, the others padded to
    different lengths (one to a single token), so that groups hold pad members, some only pad."""
    rng = np.random.default_rng(seed)
    lengths = [n] + [int(x) for x in rng.integers(1, n, batch - 1)]
    lengths[-1] = 1 if batch > 1 else n
    mask = (np.arange(n)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    ids = rng.integers(2, vocab_size, (batch, n)).astype(np.int64) * mask
    return ids, mask


def relative_difference(x, reference) -> float:
    """max |x - reference| / max |reference|, in float64."""
    x, reference = np.asarray(x, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(x - reference)) / max(np.max(np.abs(reference)), 1e-30))


def jax_encoder(backbone_dir: str, plugin_dir: str | None = None):
    """`(ids, mask) -> [b, n, d] float32` through JAX's `model.encode` with the plugin, after
    refusing a plugin trained on another backbone."""
    import jax.numpy as jnp

    from variator_jax import model, plugins
    from variator_jax.convert import load_hf_t5
    cfg, backbone = load_hf_t5(backbone_dir)
    plugin = None
    if plugin_dir is not None:
        check_plugin_backbone(plugin_dir, cfg, backbone)
        plugin = plugins.load_plugin(plugin_dir, cfg=cfg)
    return lambda ids, mask: np.asarray(model.encode(cfg, backbone, jnp.asarray(ids, jnp.int32),
                                                     jnp.asarray(mask, jnp.int32), plugin))


def check_plugin_backbone(plugin_dir: str, cfg, backbone) -> None:
    """Raises a one-line ValueError unless the plugin in `plugin_dir` fits this backbone:
    same d_model and encoder layers, and the same fingerprint when the file recorded one
    (`load_plugin` only warns about that; an export would ship the mismatch)."""
    from variator_jax import plugin_file, plugins
    config = plugin_file.read_config(plugin_dir)
    if config.get("compressor", "variator") != "variator":
        raise ValueError(f"{plugin_dir} holds the training-free {config['compressor']!r} "
                         "compressor; the export runs Variator plugins only")
    for field, have in (("d_model", cfg.d_model), ("num_layers", cfg.num_layers)):
        if config[field] != have:
            raise ValueError(f"{plugin_dir}: a plugin for another backbone ({field} "
                             f"{config[field]}, this backbone has {have})")
    recorded = config.get("backbone") or {}
    if recorded.get("fingerprint") and recorded["fingerprint"] != plugins.fingerprint_of(recorded,
                                                                                        backbone):
        raise ValueError(f"{plugin_dir}: trained on backbone "
                         f"{recorded.get('name') or recorded['fingerprint']} (fingerprint "
                         f"{recorded['fingerprint']}), not on this one; export it with the "
                         "backbone it was trained on")


def onnx_runner(path: str, threads: int | None = None, spinning: bool = True):
    """ONNX Runtime (CPU) session on the graph at `path`, as a function of [b, n] ids and
    mask -> [b, n, d] float32. `threads`: intra-op threads (default: ONNX Runtime's).
    `spinning=False`: its threads sleep when a call ends instead of busy-waiting for the next
    (ONNX Runtime's default), which would take the cores from whatever runs next."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return lambda ids, mask: session.run([OUTPUT], {INPUTS[0]: np.asarray(ids, np.int64),
                                                    INPUTS[1]: np.asarray(mask, np.int64)})[0]


def run_onnx(path: str, ids, mask) -> np.ndarray:
    """One call of `onnx_runner(path)`."""
    return onnx_runner(path)(ids, mask)


# -- Export ----------------------------------------------------------------------------------------
def _trace(module, vocab_size: int):
    """torch.onnx.export (dynamo) of `module` with batch and length dynamic -> ONNXProgram."""
    import torch
    # Traced at a length that is no multiple of 2, 4 or 8 and checked at another (see export).
    ids, mask = (torch.from_numpy(a) for a in check_batch(vocab_size, 2, 11, seed=1))
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("length")}
    # Under no_grad: with autograd on, the decomposition step fails on HF attention's reshape
    # of a transposed view ("Cannot view a tensor with shape ...").
    with torch.no_grad():
        return torch.onnx.export(module, (ids, mask), input_names=list(INPUTS),
                                 output_names=[OUTPUT], dynamic_shapes=(dims, dims), dynamo=True,
                                 verbose=False)


def _require_exporter() -> None:
    """A one-line error, before any weight is read, when the export's packages are missing."""
    import importlib.util
    missing = [m for m in ("torch", "onnx", "onnxscript", "onnxruntime")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"the ONNX export needs {', '.join(missing)}: pip install "
                        "'variator_jax[onnx]'")


def export_encoder(backbone_dir: str, out_path: str, plugin_dir: str | None = None,
                   tolerance: float = TOLERANCE) -> dict:
    """Writes the encoder (with the plugin, if any) to `out_path` as ONNX, after checking it.

    Returns {"onnx": relative difference of ONNX Runtime to JAX, "torch": of PyTorch to JAX,
    "shape": the checked batch's [batch, n]}. Raises ExportError (nothing written) when either
    is above `tolerance`, ValueError for a plugin of another backbone.

    Example:
      >>> export_encoder("export/backbone", "export/encoder-k4.onnx",
      ...                "demo_workdir/adapt-k4/plugin")
      {'onnx': 1.1e-07, 'torch': 9.6e-08, 'shape': [3, 37]}
    """
    _require_exporter()
    import torch
    reference = jax_encoder(backbone_dir, plugin_dir)  # Refuses a foreign plugin first.
    module = _wrapped(hf_encoder(backbone_dir, plugin_dir))
    vocab = module.model.config.vocab_size
    ids, mask = check_batch(vocab, 3, 37, seed=2)  # Another batch and length than traced.
    expected = reference(ids, mask)
    with torch.no_grad():
        got_torch = module(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    program = _trace(module, vocab)
    out_dir = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    # Saved in a scratch directory beside the target with the final name: a graph over 2 GB
    # keeps its weights in a side file whose name the graph records.
    scratch = tempfile.mkdtemp(dir=out_dir, prefix=".onnx-export-")
    try:
        staged = os.path.join(scratch, os.path.basename(out_path))
        program.save(staged)
        result = {"onnx": relative_difference(run_onnx(staged, ids, mask), expected),
                  "torch": relative_difference(got_torch, expected), "shape": list(ids.shape)}
        for runtime in ("onnx", "torch"):
            if not result[runtime] <= tolerance:  # `not <=`: NaN fails too.
                raise ExportError(f"{runtime} output differs from JAX's encoder by "
                                  f"{result[runtime]:.3g} (relative) on a padded {ids.shape} "
                                  f"batch, above the tolerance {tolerance:g}; {out_path} not "
                                  "written")
        for name in os.listdir(scratch):
            os.replace(os.path.join(scratch, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return result


# -- Command line ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet():
    """The command's output is its result line: HF's loading progress bar and load report (an
    encoder read from a seq2seq checkpoint leaves `lm_head.weight` unused, as it should), the
    exporter's notes on optional operator sets (torchvision's) and its deprecation warnings
    are left out."""
    import transformers
    exporter = logging.getLogger("torch.onnx._internal.exporter._registration")
    level, verbosity = exporter.level, transformers.utils.logging.get_verbosity()
    exporter.setLevel(logging.ERROR)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=r"# The axis name: ")
            yield
    finally:
        exporter.setLevel(level)
        transformers.utils.logging.set_verbosity(verbosity)
        transformers.utils.logging.enable_progress_bar()


def main(argv=None) -> int:
    """`python -m variator_jax.convert onnx BACKBONE_DIR OUT.onnx [--plugin PLUGIN_DIR]`."""
    parser = argparse.ArgumentParser(
        prog="python -m variator_jax.convert onnx",
        description="Export the T5 encoder (with a plugin, if given) to ONNX: inputs input_ids "
                    "and attention_mask [batch, n] int64, output last_hidden_state [batch, n, "
                    "d_model] float32, batch and n dynamic. The graph is checked against JAX's "
                    "encoder on a padded batch before it is written.")
    parser.add_argument("backbone", help="HF T5 directory (config.json + weights)")
    parser.add_argument("out", help="the .onnx file to write")
    parser.add_argument("--plugin", help="plugin directory (plugin.safetensors + "
                                         "plugin_config.json) trained on this backbone")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help="largest relative difference to JAX's encoder that is written")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    args = parser.parse_args(argv)  # Errors: one line from the boundary (`convert`'s main).
    if os.path.exists(args.out) and not args.overwrite:
        raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
    with _quiet():
        result = export_encoder(args.backbone, args.out, args.plugin, args.tolerance)
    print(f"{args.out}: encoder{' with plugin ' + args.plugin if args.plugin else ''}; relative "
          f"difference to JAX on a padded {result['shape']} batch: ONNX Runtime "
          f"{result['onnx']:.2e}, PyTorch {result['torch']:.2e}")
    return 0
