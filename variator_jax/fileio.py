"""Atomic file writes and nested-dict paths, shared by the checkpoint and plugin converters."""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable


def atomic_write(directory: str, name: str, write: Callable[[str], object]) -> None:
    """`write(tmp_path)` then rename onto `directory/name`: a failure leaves the old file."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, os.path.join(directory, name))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_writable(path: str, need_bytes: int = 0) -> None:
    """Raises an OSError naming `path` unless files can be written there, before any long
    work: the nearest existing directory on the way to `path` gets a small temporary file
    (removed again: nothing is left behind, and a missing `path` stays missing), and, with
    `need_bytes`, its file system must have about that much free space."""
    probe = os.path.abspath(path)
    while not os.path.isdir(probe):
        if os.path.lexists(probe):  # A file where a directory should be (or on the way).
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory (a file is in the way)",
                                     probe)
        probe = os.path.dirname(probe)
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".write-probe.")
        try:
            os.write(fd, bytes(4096))  # A full disk or a file-size limit fails here.
        finally:
            os.close(fd)
            os.remove(tmp)
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise OSError(errno.ENOSPC, f"No space left on device (about {need_bytes / 1e6:.1f} MB "
                      f"needed, {free / 1e6:.1f} MB free)", path)


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def write_json(directory: str, name: str, obj, indent: int = 2) -> None:
    """`obj` as indented JSON, a newline at the end, onto `directory/name` (`atomic_write`)."""
    atomic_write(directory, name,
                 lambda tmp: write_text(tmp, json.dumps(obj, indent=indent) + "\n"))


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def get_path(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def set_path(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value
