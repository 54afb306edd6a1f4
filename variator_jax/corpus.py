"""Random access to text and JSONL corpora of any size, through a cached byte-offset index.

A `text:` file holds documents separated by blank lines (lines of spaces/tabs only); a
`jsonl:` file one JSON object per non-blank line. `open_files(pattern)` accepts a file, a
directory (every non-hidden file in it) or a glob (`/data/wiki/*.txt`), plain or gzip.

Nothing keeps the text in memory. The first use of a file scans it once (numpy over 16 MiB
blocks) and writes an index: the byte span of every record (and, for JSONL, its line
number) as raw int64 files, appended block by block and memory-mapped afterwards; a record
is read with one `pread`.
The index records the file's size and mtime; a file that changed or shrank since is
re-indexed on the next open. A text document longer than `MAX_RECORD_BYTES` is cut at
line boundaries into several records, so that one giant "document" (a file without
blank lines) never has to fit in memory.

gzip has no random access. A `.gz` file is decompressed once, streaming, into the index
directory (disk, not memory) and that copy is indexed like a plain file. Corpora too big
to hold decompressed should be stored uncompressed, or as ArrayRecord behind tfds.

Bad records stop the run with a one-line error naming the place (`FILE:LINE: invalid
JSON ...`, `FILE: byte OFFSET is not UTF-8 ...`), raised when the record is read, not
after a pass over everything: a corrupt corpus is fixed, not silently trained around.

Example:
  >>> docs = open_files("/data/wiki/*.txt", "text")
  >>> len(docs), docs[0]            # (number of documents, {"text": "..."})
"""
from __future__ import annotations

import glob as glob_lib
import gzip
import hashlib
import json
import os
import shutil
from collections.abc import Sequence

import numpy as np

INDEX_VERSION = 1
MAX_RECORD_BYTES = 1 << 20  # A text record longer than this is split at line boundaries.
_BLOCK = 4 << 20  # Bytes scanned at a time while indexing (~10x that in temporaries).
_SPACE = np.zeros(256, bool)
_SPACE[list(b" \t\r\f\v\n")] = True  # What a blank line may hold (re's [ \t\r\f\v], + "\n").


class CorpusError(ValueError):
    """A corpus file is missing, malformed or undecodable; the message names the place."""


# ================================== files ====================================


def expand(pattern: str, scheme: str) -> list[str]:
    """A file, a directory or a glob -> sorted list of files; an error names what is missing."""
    if any(c in pattern for c in "*?["):
        paths = sorted(p for p in glob_lib.glob(pattern) if os.path.isfile(p))
        if not paths:
            raise FileNotFoundError(f"{scheme} source: the pattern {pattern} matches no file")
        return paths
    if os.path.isdir(pattern):
        paths = sorted(os.path.join(pattern, f) for f in os.listdir(pattern)
                       if not f.startswith(".") and os.path.isfile(os.path.join(pattern, f)))
        if not paths:
            raise FileNotFoundError(f"{scheme} source: the directory {pattern} holds no file")
        return paths
    if not os.path.isfile(pattern):
        raise FileNotFoundError(f"{scheme} source: no such file: {pattern}")
    return [pattern]


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _stamp(path: str) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "version": INDEX_VERSION}


def _default_index_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "variator_jax", "index")


def _index_base(path: str, kind: str, index_dir: str | None) -> str:
    """Where `path`'s index lives: `index_dir` (default: the user's cache), keyed by the
    file's absolute path so that two corpora with one name do not collide."""
    path = os.path.abspath(path)
    key = hashlib.sha1(f"{path}\0{kind}".encode()).hexdigest()[:16]
    return os.path.join(index_dir or _default_index_dir(), f"{os.path.basename(path)}.{key}")


# ================================ indexing ===================================


def _line_spans(buf: np.ndarray):
    """Complete lines of `buf` (uint8) -> (starts, ends, blank, consumed bytes).

    `ends` point at each line's newline; the bytes after the last newline are left over.
    """
    nl = np.flatnonzero(buf == 10)
    starts = np.concatenate([[0], nl[:-1] + 1]) if nl.size else np.zeros(0, np.int64)
    nonspace = np.concatenate([[0], np.cumsum(~_SPACE[buf], dtype=np.int32)])
    blank = nonspace[nl] == nonspace[starts]
    consumed = int(nl[-1]) + 1 if nl.size else 0
    return starts.astype(np.int64), nl.astype(np.int64), blank, consumed


def _blocks(f):
    """(file offset, uint8 buffer of whole lines) over a binary file; the last may lack '\\n'."""
    carry, offset = b"", 0
    while True:
        block = f.read(_BLOCK)
        data = carry + block
        if not block:
            if data:
                yield offset, np.frombuffer(data + b"\n", np.uint8)
            return
        cut = data.rfind(b"\n") + 1
        if cut:
            yield offset, np.frombuffer(data[:cut], np.uint8)
        carry, offset = data[cut:], offset + cut


class _Sink:
    """Index arrays (int64) appended block by block to files beside `base`, so that an
    index is built in constant memory however many records the file holds."""

    def __init__(self, base: str, names: Sequence[str]):
        self._final = {n: f"{base}.{n}.i64" for n in names}
        self._tmp = {n: f"{p}.tmp{os.getpid()}" for n, p in self._final.items()}
        self._files = {n: open(p, "wb") for n, p in self._tmp.items()}

    def add(self, **arrays) -> None:
        for n, a in arrays.items():
            self._files[n].write(np.asarray(a, np.int64).tobytes())

    def close(self) -> None:
        for n, f in self._files.items():
            f.close()
            os.replace(self._tmp[n], self._final[n])


def _map(path: str) -> np.ndarray:
    """A memory map of an index array (np.memmap refuses empty files)."""
    return np.memmap(path, np.int64, "r") if os.path.getsize(path) else np.zeros(0, np.int64)


def _index_jsonl(f, sink: _Sink) -> None:
    """Spans and 1-based line numbers of the non-blank lines."""
    line0 = 0
    for offset, buf in _blocks(f):
        s, e, blank, _ = _line_spans(buf)
        keep = ~blank
        sink.add(starts=s[keep] + offset, ends=e[keep] + offset,
                 lines=np.flatnonzero(keep) + line0 + 1)
        line0 += s.size


def _index_text(f, sink: _Sink) -> None:
    """Spans of the documents: maximal runs of non-blank lines (a doc's span excludes its
    last newline); a run may continue from one block into the next."""
    open_start = open_end = None  # The document still open at the end of the last block.
    for offset, buf in _blocks(f):
        s, e, blank, _ = _line_spans(buf)
        if not s.size:
            continue
        prev_blank = np.concatenate([[open_start is None], blank[:-1]])
        next_blank = np.concatenate([blank[1:], [False]])  # The last line's fate is unknown.
        doc_starts = list(s[~blank & prev_blank] + offset)
        doc_ends = list(e[~blank & next_blank] + offset)
        if open_start is not None:
            doc_starts.insert(0, open_start)
            if blank[0]:  # It ended with the last block.
                doc_ends.insert(0, open_end)
        open_start = None
        if not blank[-1]:  # The last line is in a document that may go on.
            open_start, open_end = doc_starts.pop(), int(e[-1]) + offset
        sink.add(starts=doc_starts, ends=doc_ends)
    if open_start is not None:
        sink.add(starts=[open_start], ends=[open_end])


def _split_long(f, starts: np.ndarray, ends: np.ndarray, sink: _Sink) -> None:
    """Copies the spans to `sink`, cutting records over MAX_RECORD_BYTES after a newline
    (or, in a line longer than that, before a UTF-8 lead byte); reads only those records."""
    for lo in range(0, len(starts), 1 << 20):
        s, e = np.asarray(starts[lo:lo + (1 << 20)]), np.asarray(ends[lo:lo + (1 << 20)])
        out_s, out_e = [], []
        for start, end in zip(s.tolist(), e.tolist(), strict=True):
            while end - start > MAX_RECORD_BYTES:
                f.seek(start)
                chunk = f.read(MAX_RECORD_BYTES + 1)
                cut = chunk.rfind(b"\n", 0, MAX_RECORD_BYTES) + 1
                if not cut:  # One huge line: cut before a byte that starts a character.
                    cut = MAX_RECORD_BYTES
                    while cut > 1 and chunk[cut] & 0xC0 == 0x80:  # 10xxxxxx: continuation.
                        cut -= 1
                out_s.append(start)
                out_e.append(start + cut)
                start += cut
            out_s.append(start)
            out_e.append(end)
        sink.add(starts=out_s, ends=out_e)


def load_index(path: str, kind: str, index_dir: str | None = None) -> dict[str, np.ndarray]:
    """The memory-mapped index of `path` (plain text), built or rebuilt if it is missing or
    the file changed since (size or mtime)."""
    base = _index_base(path, kind, index_dir)
    meta_path = f"{base}.json"
    stamp = _stamp(path)
    names = ("starts", "ends", "lines") if kind == "jsonl" else ("starts", "ends")
    try:
        with open(meta_path) as f:
            if json.load(f) == stamp:
                return {n: _map(f"{base}.{n}.i64") for n in names}
    except (OSError, ValueError):
        pass  # Missing, stale or half-written: build it anew.
    os.makedirs(os.path.dirname(base), exist_ok=True)
    with open(path, "rb") as f:
        if kind == "jsonl":
            sink = _Sink(base, names)
            _index_jsonl(f, sink)
            sink.close()
        else:
            sink = _Sink(f"{base}.spans", names)
            _index_text(f, sink)
            sink.close()
            spans = {n: _map(f"{base}.spans.{n}.i64") for n in names}
            step = 1 << 20  # (In slices: a whole-array temporary would grow with the file.)
            if any(np.any(spans["ends"][i:i + step] - spans["starts"][i:i + step]
                          > MAX_RECORD_BYTES) for i in range(0, len(spans["ends"]), step)):
                sink = _Sink(base, names)
                _split_long(f, spans["starts"], spans["ends"], sink)
                sink.close()
                for n in names:
                    os.remove(f"{base}.spans.{n}.i64")
            else:
                for n in names:
                    os.replace(f"{base}.spans.{n}.i64", f"{base}.{n}.i64")
    with open(f"{meta_path}.tmp{os.getpid()}", "w") as f:
        json.dump(stamp, f)
    os.replace(f"{meta_path}.tmp{os.getpid()}", meta_path)
    if _stamp(path) != stamp:
        raise CorpusError(f"{path} changed while it was being indexed")
    return {n: _map(f"{base}.{n}.i64") for n in names}


def _plain_copy(path: str, index_dir: str | None) -> str:
    """A gzip file's decompressed copy in the index directory (made once, streaming)."""
    base = _index_base(path, "gunzip", index_dir)
    out, meta_path = f"{base}.plain", f"{base}.plain.json"
    stamp = _stamp(path)
    try:
        with open(meta_path) as f:
            if json.load(f) == stamp and os.path.isfile(out):
                return out
    except (OSError, ValueError):
        pass
    os.makedirs(os.path.dirname(base), exist_ok=True)
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        with gzip.open(path, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, _BLOCK)
    except (OSError, EOFError) as e:
        raise CorpusError(f"{path}: not a readable gzip file ({e})") from None
    os.replace(tmp, out)
    with open(meta_path, "w") as f:
        json.dump(stamp, f)
    return out


# ================================ the source =================================


class IndexedCorpus:
    """Random-access records of one or more text/JSONL files; a grain data source.

    `corpus[i]` is `{"text": str}` (text) or the JSON object (jsonl). Picklable, and
    cheap to pickle (paths and memory maps), so grain worker processes can share it.
    """

    def __init__(self, pattern: str, kind: str, index_dir: str | None = None):
        if kind not in ("text", "jsonl"):
            raise ValueError(f"unknown corpus kind {kind!r}")
        self.pattern, self.kind, self._index_dir = pattern, kind, index_dir
        self.paths = expand(pattern, kind)
        self._readable = [_plain_copy(p, index_dir) if _is_gzip(p) else p for p in self.paths]
        self._indices = [load_index(p, kind, index_dir) for p in self._readable]
        self._stamps = [_stamp(p) for p in self._readable]
        counts = [len(ix["starts"]) for ix in self._indices]
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_fds"}

    def __setstate__(self, state):
        self.__dict__.update(state, _fds={})

    def _fd(self, f: int) -> int:
        if self._pid != os.getpid():  # A forked worker: open its own descriptors.
            self._fds, self._pid = {}, os.getpid()
        if f not in self._fds:
            self._fds[f] = os.open(self._readable[f], os.O_RDONLY)
        return self._fds[f]

    def locate(self, i: int) -> tuple[str, int, int | None]:
        """(file, byte offset, line number or None) of record `i`."""
        f = int(np.searchsorted(self._offsets, i, side="right")) - 1
        j = i - int(self._offsets[f])
        ix = self._indices[f]
        line = int(ix["lines"][j]) if "lines" in ix else None
        return self.paths[f], int(ix["starts"][j]), line

    def __getitem__(self, i: int):
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} of {len(self)}")
        f = int(np.searchsorted(self._offsets, i, side="right")) - 1
        j = i - int(self._offsets[f])
        ix = self._indices[f]
        start, end = int(ix["starts"][j]), int(ix["ends"][j])
        raw = os.pread(self._fd(f), end - start, start)
        if len(raw) != end - start:
            raise CorpusError(f"{self.paths[f]} shrank while in use (record at byte {start} "
                              "is cut short); restart to re-index it")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorpusError(f"{self.paths[f]}: byte {start + e.start} is not UTF-8 "
                              f"({e.reason}: {raw[e.start:e.start + 1]!r})") from None
        if self.kind == "text":
            return {"text": text.strip()}
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{self.paths[f]}:{int(ix['lines'][j])}: invalid JSON: "
                              f"{e.msg}") from None
        if not isinstance(record, dict):
            raise CorpusError(f"{self.paths[f]}:{int(ix['lines'][j])}: expected a JSON "
                              f"object, got {type(record).__name__}")
        return record

    def __repr__(self) -> str:
        return f"IndexedCorpus({self.kind}:{self.pattern}, {len(self)} records)"


def open_files(pattern: str, kind: str, index_dir: str | None = None) -> IndexedCorpus:
    """The records of the files `pattern` names, indexed; see the module docstring."""
    return IndexedCorpus(pattern, kind, index_dir)


def describe(paths: Sequence[str]) -> str:
    total = sum(os.path.getsize(p) for p in paths)
    return f"{len(paths)} file(s), {total / 1e6:.1f} MB"
