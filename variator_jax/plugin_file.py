"""Strict reading of a plugin directory, shared by the JAX and the PyTorch side.

Both `plugins.load_plugin` and `torch_plugin.attach_plugin` read through it: numpy and
safetensors only, no JAX, no torch.

A plugin file that loads must be one `save_plugin` could have written: `plugin_config.json`
is a JSON object whose fields have their exact types (`"mask_aware": "false"`, a string,
is refused rather than read as True) and no field it does not know (a typo `ratiio` is
refused by name, not ignored), and every tensor is float32 and finite (an int32
tensor is refused rather than cast, a NaN is refused rather than turned into NaN logits).
Each error is one line naming the file and the key.
"""
from __future__ import annotations

import difflib
import json
import math
import os

import numpy as np

PLUGIN_FILE = "plugin.safetensors"
CONFIG_FILE = "plugin_config.json"

# Field -> (accepted Python types, description); bool is not an int here.
_CONFIG_TYPES = {
    "ratio": (int, "a positive integer"),
    "bottleneck": (int, "a positive integer"),
    "d_model": (int, "a positive integer"),
    "num_layers": (int, "a positive integer"),
    "mask_aware": (bool, "true or false"),
    "scope": (str, "a string"),
}
REQUIRED_FIELDS = tuple(_CONFIG_TYPES)
# Every field `save_plugin` writes; any other (a typo such as `ratiio`) is refused by name.
KNOWN_FIELDS = REQUIRED_FIELDS + ("compressor", "backbone", "format")


def _describe(value) -> str:
    kinds = {str: "a string", bool: "a boolean", int: "an integer", float: "a number",
             list: "a list", dict: "an object", type(None): "null"}
    kind = kinds.get(type(value), type(value).__name__)
    return f"{json.dumps(value)} ({kind})"


def check_config(config, path: str) -> dict:
    """Raises a one-line ValueError unless `config` (the parsed `plugin_config.json`) has
    every field with its exact type; returns it unchanged."""
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a valid plugin config (a JSON object is expected, got "
                         f"{type(config).__name__})")
    unknown = sorted(set(config) - set(KNOWN_FIELDS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], KNOWN_FIELDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{path}: unknown field {unknown[0]!r}{hint}; a plugin config holds "
                         f"only {', '.join(KNOWN_FIELDS)}")
    missing = [name for name in REQUIRED_FIELDS if name not in config]
    if missing:
        raise ValueError(f"{path}: not a valid plugin config: lacks field(s) {missing}")
    compressor = config.get("compressor", "variator")
    if not isinstance(compressor, str):
        raise ValueError(f"{path}: field 'compressor' must be a string, got "
                         f"{_describe(compressor)}")
    for name, (kind, what) in _CONFIG_TYPES.items():
        value = config[name]
        if name in ("d_model", "num_layers") and value is None and compressor != "variator":
            continue  # A training-free compressor saved without a backbone: sizes unknown.
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if ok and kind is int:
            ok = value >= 1
        if not ok:
            raise ValueError(f"{path}: field {name!r} must be {what}, got {_describe(value)}")
    if not isinstance(config.get("format", ""), str):
        raise ValueError(f"{path}: field 'format' must be a string, got "
                         f"{_describe(config['format'])}")
    backbone = config.get("backbone")
    if backbone is not None and not isinstance(backbone, dict):
        raise ValueError(f"{path}: field 'backbone' must be an object or null, got "
                         f"{_describe(backbone)}")
    return config


def read_config(directory: str) -> dict:
    """`DIRECTORY/plugin_config.json`, checked by `check_config`."""
    path = os.path.join(os.fspath(directory), CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (a plugin directory holds {PLUGIN_FILE} and "
                                f"{CONFIG_FILE})")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid plugin config ({type(e).__name__}: {e})") from None
    return check_config(config, path)


def read_tensors(directory: str) -> dict[str, np.ndarray]:
    """`DIRECTORY/plugin.safetensors` -> {key: float32 array}; refuses a file that is not
    safetensors (truncated, empty, ...), a tensor that is not float32, or one that holds a
    NaN or an infinity, naming the path and the key."""
    from safetensors import safe_open
    path = os.path.join(os.fspath(directory), PLUGIN_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (a plugin directory holds {PLUGIN_FILE} and "
                                f"{CONFIG_FILE})")
    tensors = {}
    try:
        with safe_open(path, framework="numpy") as f:
            for key in f.keys():
                dtype = f.get_slice(key).get_dtype()
                if dtype != "F32":
                    raise ValueError(f"{path}: {key} has dtype {dtype}, expected F32 (float32); "
                                     "plugin files hold float32 weights")
                tensors[key] = f.get_tensor(key)
    except ValueError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt files.
        raise ValueError(f"{path}: cannot read safetensors file ({type(e).__name__}: "
                         f"{_first_line(e)})") from None
    for key, value in tensors.items():
        if not np.all(np.isfinite(value)):
            bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
            first = value[~np.isfinite(value)].flat[0]
            raise ValueError(f"{path}: {key} holds {bad} non-finite value(s) (e.g. {first}); "
                             "a plugin trained to NaN or inf cannot be used")
    return tensors


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_plugin_dir(directory: str) -> tuple[dict, dict[str, np.ndarray]]:
    """-> (checked config dict, {key: finite float32 array}); keys and shapes are checked
    by the caller against the config (each side builds its own tree)."""
    config = read_config(directory)
    return config, read_tensors(directory)


def is_finite_number(x) -> bool:
    """A real number (not a bool, not a string) that is finite even in float32."""
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        return False
    return math.isfinite(float(x)) and abs(float(x)) <= float(np.finfo(np.float32).max)
