r"""What the command-line entry points share: config lookup, one-line errors, `--show_config`.

`variator-train` / `python -m variator_jax.train` / `python train.py` and their eval twins
parse flags through `parse_flags`, which

  - finds `--config=NAME[:PRESETS]` in the installed package when NAME is not a file
    (`plugin`, `plugin.py` and `configs/plugin.py` all name `variator_jax/configs/plugin.py`);
  - loads the config once before absl does, so that a bad preset or a `--config.FIELD=`
    typo is one line naming the full dotted field and the closest real one:
        error: no config field 'plugin.bottlenek'; did you mean 'plugin.bottleneck'?
  - turns absl's own errors (unknown flags, bad values) into one line as well.

Both run inside the error boundary (boundary.py), and so do the modules with a `main(argv)`
over argparse (`variator_jax.flops`, `variator_jax.convert`, `benchmarks/*`), through
`run_main`: bad input, a full disk, Ctrl-C and a closed pipe end in one line, not a
traceback (`--debug` or `VARIATOR_DEBUG=1` shows the traceback instead).
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Sequence

from variator_jax import boundary

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
_COMMENTS: dict[str, str] = {}  # Field comments of the config parse_flags loaded.
# `--config.a.b=v`, `--config.a.b v`, `--noconfig.flag`: the field named is group (1).
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)(?:=|$)")


def fail(message: str, code: int = 1):
    """Prints `error: MESSAGE` (one line) to stderr and exits with `code`."""
    boundary.say_error(message)  # One line, whatever the message held.
    sys.exit(code)


# -- Finding and loading config files -------------------------------------------------------------
def packaged_configs() -> list[str]:
    """Names of the configs shipped in variator_jax/configs (without `.py`)."""
    return sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                  if f.endswith(".py") and not f.startswith("_") and f != "common.py")


def resolve_config(spec: str) -> str:
    """'plugin:stage=adapt' -> '/.../variator_jax/configs/plugin.py:stage=adapt'.

    A path to an existing file is kept as it is; otherwise its base name (with `.py` added)
    is looked up among the packaged configs, so the README's `configs/plugin.py` works from
    any directory and after a non-editable install.
    """
    path, sep, arg = spec.partition(":")
    if os.path.isfile(path):
        return spec
    name = os.path.basename(path)
    name = name if name.endswith(".py") else name + ".py"
    packaged = os.path.join(CONFIG_DIR, name)
    if os.path.isfile(packaged) and name != "common.py":
        return packaged + sep + arg
    raise ValueError(f"config file {path!r} not found; packaged configs: "
                     f"{', '.join(packaged_configs())} (or a path to a config file)")


def load_config(spec: str, comments: dict | None = None):
    """`PATH_OR_NAME[:PRESETS]` -> the ConfigDict that module's `get_config(PRESETS)` returns;
    `comments`, if given, receives each field's comment (see `field_comments`)."""
    path, sep, arg = resolve_config(spec).partition(":")
    module_spec = importlib.util.spec_from_file_location("variator_user_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} has no get_config(arg) function")
    config, found = field_comments(module.get_config, *([arg] if sep else []))
    if comments is not None:
        comments.update(found)
    return config


def check_overrides(config, argv: Sequence[str]) -> None:
    """Raises ValueError naming the first `--config.FIELD` that `config` lacks, with the
    full dotted path and the closest existing field."""
    for arg in argv:
        match = _OVERRIDE.match(arg)
        if not match:
            continue
        node, done = config, []
        for part in match.group(1).split("."):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if part not in keys:
                where = ".".join(done)
                if not keys:
                    raise ValueError(f"config field {where!r} holds a {type(node).__name__}, not "
                                     f"a group of fields: --config.{match.group(1)} cannot be set")
                close = difflib.get_close_matches(part, keys, n=1)
                hint = f"; did you mean {'.'.join(done + close)!r}?" if close else ""
                raise ValueError(f"no config field {'.'.join(done + [part])!r}{hint}")
            node, done = node[part], done + [part]


# -- Showing a config ---------------------------------------------------------------------------
# `OBJ.a.b = value  # comment` in a config file: the comment documents field a.b of OBJ.
_COMMENTED = re.compile(r"^\s*(\w+)\.([\w.]+)\s*=[^#]*#\s*(.+?)\s*$")


def field_comments(get_config: Callable, *args) -> tuple[object, dict[str, str]]:
    """Calls a config's `get_config(*args)` and returns (config, {dotted field: comment}).

    Every config line sets one field and says what it is in a trailing comment. Tracing
    the lines as they run ties each comment to the ConfigDict it set, so a chained
    config's `backbone_stage.lr` gets the comment of the line that set it, not some other
    file's `lr`.
    """
    records = []  # (id of the ConfigDict assigned to, relative path, comment), in run order.
    cache = {}

    def tracer(frame, event, arg):
        if event == "line":
            path = frame.f_code.co_filename
            if path not in cache:
                try:
                    with open(path) as f:
                        cache[path] = f.read().splitlines()
                except OSError:
                    cache[path] = []
            lines = cache[path]
            line = lines[frame.f_lineno - 1] if frame.f_lineno <= len(lines) else ""
            match = _COMMENTED.match(line)
            if match and hasattr(frame.f_locals.get(match.group(1)), "keys"):
                records.append((id(frame.f_locals[match.group(1)]), match.group(2), match.group(3)))
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        config = get_config(*args)
    finally:
        sys.settrace(previous)
    if not hasattr(config, "keys"):  # Not a ConfigDict (a config may return anything).
        return config, {}
    paths = {id(config): ""}  # Each ConfigDict in the result -> its dotted prefix.
    for name, value in _flatten(config, groups=True):
        paths.setdefault(id(value), name + ".")
    comments = {}
    for node, rel, comment in records:  # Later lines win, as they set the value last.
        if node in paths:
            comments[paths[node] + rel] = comment
    return config, comments


def _flatten(config, prefix: str = "", groups: bool = False):
    """(dotted name, value) for every leaf; with `groups`, the sub-ConfigDicts instead."""
    for key in config.keys():
        value = config[key]
        if hasattr(value, "keys"):
            if groups:
                yield f"{prefix}{key}", value
            yield from _flatten(value, f"{prefix}{key}.", groups)
        elif not groups:
            yield f"{prefix}{key}", value


def describe_config(config, comments: dict[str, str] | None = None) -> str:
    """Every field as `dotted.name = value  # comment`, one per line."""
    comments = comments or {}
    rows = [(f"{name} = {value!r}", comments.get(name, "")) for name, value in _flatten(config)]
    width = min(max(len(left) for left, _ in rows), 48)  # Align the comments, within reason.
    return "\n".join(f"{left:<{width}}  # {note}" if note else left for left, note in rows)


# -- absl entry points ----------------------------------------------------------------------------
def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser for train.py / eval.py, with config lookup and one-line errors."""
    from absl import flags
    argv, config = list(argv), None
    for i, arg in enumerate(argv):
        match = re.match(r"^(--?config=)(.*)$", arg)
        if match:
            try:
                argv[i] = match.group(1) + resolve_config(match.group(2))
                config = load_config(match.group(2), _COMMENTS)
                check_overrides(config, argv)
            except Exception as e:  # A bad preset, a typo'd field, a broken config file.
                fail(f"{boundary.first_line(e)} (in --config={match.group(2)})", 2)
    # ml_collections reads the overrides from sys.argv itself: keep it in step with argv.
    sys.argv[:] = argv
    if any(arg in ("--help", "-h", "-?", "--helpshort", "--helpfull") for arg in argv[1:]):
        try:
            flags.FLAGS(argv)
        except SystemExit as e:  # absl exits 1 after printing help; asking is not an error.
            if config is not None and e.code == 1:  # `--config=X --help`: X's fields too.
                print("\nFields of this --config (override with --config.FIELD=VALUE):\n")
                print(describe_config(config, _COMMENTS))
            sys.exit(0 if e.code == 1 else e.code)
    try:
        argv = flags.FLAGS(argv)
        getattr(flags.FLAGS.config, "stage", None)  # A config that failed to load raises here.
        return argv
    except Exception as e:  # flags.Error and a config field's bad value.
        fail(boundary.first_line(e), 2)


def run_absl(main: Callable, doc: str, module: str,
             interrupted: Callable[[], str] | None = None) -> None:
    """app.run(main) with `parse_flags`, inside the error boundary (boundary.py, which
    `interrupted()` tells what a Ctrl-C stopped); `doc` is the usage text `--help` prints,
    and the flags defined by `module` (the entry point's __name__) are listed with it."""
    from absl import app, flags
    # absl's --help prints the __main__ module's docstring and the flags defined there: a
    # console script or the repo's train.py shim would otherwise show neither.
    sys.modules["__main__"].__doc__ = doc
    shown = flags.FLAGS.get_flags_for_module(sys.argv[0])
    for flag in flags.FLAGS.get_flags_for_module(sys.argv[0] if module == "__main__" else module):
        if flag not in shown:
            flags.FLAGS.register_flag_by_module(sys.argv[0], flag)
    boundary.guard(lambda: app.run(main, flags_parser=parse_flags), interrupted=interrupted)


def start(argv: Sequence[str], flag_values) -> bool:
    """The opening of train.py's and eval.py's `main`: rejects stray arguments, handles
    `--show_config` (returns False: nothing else to do), requires `--workdir`, quietens
    absl/orbax INFO logs."""
    from absl import logging
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])} (flags are --NAME=VALUE; see --help)", 2)
    if flag_values.show_config:
        print(describe_config(flag_values.config, _COMMENTS))
        return False
    if not flag_values.workdir:
        fail("--workdir is required (the run's directory), or pass --show_config", 2)
    logging.set_verbosity(logging.WARNING)  # orbax and absl INFO chatter would drown progress.
    return True


def run_main(main: Callable, argv: Sequence[str] | None = None,
             interrupted: Callable[[], str] | None = None):
    """Runs an argparse `main(argv)` inside the error boundary (boundary.py): bad input, a
    full disk, Ctrl-C or a closed pipe end in one line (or none) instead of a traceback."""
    return boundary.guard(main, argv, interrupted=interrupted)
