"""Durable adapter store: the named adapters of a store directory survive restarts and crashes.

The store directory (`--adapter-dir`) holds the operator's adapter files; nora keeps its own
state beside them, in a hidden folder:

    <store>/*.safetensors                      the operator's files (picked up at startup)
    <store>/.nora/manifest.json                which id serves what: a snapshot ...
    <store>/.nora/journal.jsonl                ... and the changes since, one line each
    <store>/.nora/blobs/<sha256>.safetensors   adapter bytes, content-addressed (deduplicated)
    <store>/.nora/tmp-*                        writes in flight; deleted when the store opens

manifest.json:

    {"version": 1,
     "adapters": {"<id>": {"sha256": "<hex>", "source": "<path in the store, or 'inline'>",
                           "nbytes": <int>}, ...},
     "unloaded": ["<id>", ...]}

journal.jsonl: one change a line, `{"id": "<id>", "record": {...} or null, "unloaded": bool}`:
what the id serves from then on. A change costs one appended line and one fsync, whatever the
number of stored adapters (rewriting the manifest every time made loading N adapters O(N^2):
1,000 LoadAdapter calls took 20 s); the journal is folded into a new manifest when it holds
more lines than the manifest has ids (and at open), which keeps the cost amortized O(1).

An adapter's bytes are copied into a blob at load, so a replace keeps its new content even if
the file it came from changes or goes away. `unloaded` lists ids unloaded explicitly, so that
their `<id>.safetensors` file, if the operator left one, does not bring them back at startup.

Crash safety: the manifest and blobs are written to a temp file, fsynced, renamed over their
name, and their directory fsynced; a blob always before the line or manifest that names it; a
journal line is appended and fsynced before the change is acknowledged. A SIGKILL or power cut
at any moment therefore leaves the old state or the new one, naming only complete blobs: a line
cut short by a crash (no newline yet) was never acknowledged and is ignored. Folding writes
the new manifest before it empties the journal; replaying lines a manifest already holds
changes nothing (each line sets its id's whole state), so a crash in between is harmless.
Blobs that no id references are deleted after the manifest that stopped naming them is on disk
(`collect`); one orphaned by a crash in between, and any temp file, is deleted at the next open.

Not thread-safe: the registry serializes every change (AdapterRegistry._persist).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import stat
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from nora_runtime.adapter import MAX_FILE_BYTES

log = logging.getLogger(__name__)

STATE_DIR = ".nora"
MANIFEST = "manifest.json"
JOURNAL = "journal.jsonl"
BLOBS = "blobs"
BLOB_SUFFIX = ".safetensors"
_TMP_PREFIX = "tmp-"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_VERSION = 1


class StoreError(RuntimeError):
    """The store's own state is unreadable or corrupt (a server-side fault: INTERNAL)."""


@dataclass(frozen=True)
class Record:
    """What the manifest says one id serves."""

    sha256: str  # the blob's content hash
    source: str  # the file's path inside the store it was loaded from, or "inline" (bytes)
    nbytes: int


def read_regular_file(path: str | os.PathLike[str], limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file, at most `limit` + 1 of them (so the caller sees it is too
    big). Anything else (a named pipe, a device, a directory, a symlink as the last component)
    is refused before a byte is read: opening a pipe for reading would block until a writer
    came, forever. Raises OSError with a strerror fit for a client."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if st.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than the {limit}-byte limit")
        return f.read(limit + 1)


class AdapterStore:
    """The durable state of one store directory (module docstring): opened once per registry;
    creates `.nora/` if needed (OSError if the directory is not writable)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self.state_dir = self.root / STATE_DIR
        self.blob_dir = self.state_dir / BLOBS
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self._records, self._unloaded, self._journal_lines = read_state(self.root)
        self._sweep()
        if self._journal_lines or not (self.state_dir / MANIFEST).exists():
            self._fold()  # start from a snapshot (this drops a torn last line too)

    # ---- reading ------------------------------------------------------------------------------

    def records(self) -> dict[str, Record]:
        """id -> Record of every stored adapter, in order of first store."""
        return dict(self._records)

    def get(self, adapter_id: str) -> Record | None:
        return self._records.get(adapter_id)

    def is_unloaded(self, adapter_id: str) -> bool:
        return adapter_id in self._unloaded

    def read(self, record: Record) -> bytes:
        """A record's adapter bytes, checked against its hash; StoreError if missing or corrupt."""
        try:
            data = read_regular_file(self._blob(record.sha256))
        except OSError as e:
            raise StoreError(f"stored adapter blob {record.sha256[:12]} is unreadable: "
                             f"{e.strerror}") from e
        if hashlib.sha256(data).hexdigest() != record.sha256:
            raise StoreError(f"stored adapter blob {record.sha256[:12]} is corrupt")
        return data

    # ---- changes ------------------------------------------------------------------------------

    def add_blob(self, data: bytes, source: str) -> Record:
        """Write `data` as a blob (durable when this returns) and return its Record; no id
        refers to it until `set`."""
        sha = hashlib.sha256(data).hexdigest()
        path = self._blob(sha)
        if not path.exists():  # renamed into place complete, so an existing blob is whole
            self._write_atomic(path, data)
        return Record(sha, source, len(data))

    def set(self, adapter_id: str, record: Record | None, *, unloaded: bool = False) -> None:
        """Make `adapter_id` serve `record` (None: nothing; `unloaded` marks it unloaded
        explicitly) in one durable manifest write. The blob it replaces stays until `collect`."""
        line = {"id": adapter_id, "record": None if record is None else asdict(record),
                "unloaded": unloaded}
        self._append(json.dumps(line).encode() + b"\n")
        _apply(self._records, self._unloaded, adapter_id, record, unloaded)
        self._journal_lines += 1
        if self._journal_lines > max(_MIN_FOLD, len(self._records)):
            try:
                self._fold()
            except OSError as e:  # the change is durable in the journal already
                log.warning("folding the adapter journal into the manifest failed (%s); "
                            "the journal keeps growing until a fold succeeds", e)

    def state(self, adapter_id: str) -> tuple[Record | None, bool]:
        """(record, unloaded) of one id, as `set` takes them: to undo a change."""
        return self._records.get(adapter_id), adapter_id in self._unloaded

    def collect(self, *shas: str) -> None:
        """Delete those of these blobs that no id references any more."""
        used = {r.sha256 for r in self._records.values()}
        for sha in set(shas) - used:
            # a leftover blob costs only disk, and the next open deletes it
            with contextlib.suppress(OSError):
                self._blob(sha).unlink(missing_ok=True)

    # ---- internals ----------------------------------------------------------------------------

    def _blob(self, sha: str) -> Path:
        return self.blob_dir / f"{sha}{BLOB_SUFFIX}"

    def _append(self, line: bytes) -> None:
        """One journal line, on disk (fsynced) when this returns."""
        path = self.state_dir / JOURNAL
        new = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:  # the file's own directory entry must survive a power cut too
            _fsync_dir(self.state_dir)

    def _fold(self) -> None:
        """The state as a new manifest, then an empty journal (in this order: see the module
        docstring)."""
        doc = {"version": _VERSION,
               "adapters": {k: asdict(r) for k, r in self._records.items()},
               "unloaded": sorted(self._unloaded)}
        self._write_atomic(self.state_dir / MANIFEST, json.dumps(doc, indent=1).encode())
        self._write_atomic(self.state_dir / JOURNAL, b"")
        self._journal_lines = 0

    def _write_atomic(self, path: Path, data: bytes) -> None:
        """path's content becomes `data` all at once, durably: temp file, fsync, rename, fsync
        of the directory (without it the rename itself may not survive a power cut)."""
        tmp = self.state_dir / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    def _sweep(self) -> None:
        """Delete what a crash left behind: temp files, and blobs no id references. Unloaded
        marks whose file is gone are dropped at the next manifest write (nothing to hold back)."""
        for p in self.state_dir.glob(f"{_TMP_PREFIX}*"):
            p.unlink(missing_ok=True)
        used = {r.sha256 for r in self._records.values()}
        for p in self.blob_dir.iterdir():
            if p.name.removesuffix(BLOB_SUFFIX) not in used:
                p.unlink(missing_ok=True)
        self._unloaded = {i for i in self._unloaded
                          if (self.root / f"{i}{BLOB_SUFFIX}").exists()}


_MIN_FOLD = 64  # journal lines kept at least before folding (a small store folds rarely too)


def read_state(root: str | os.PathLike[str]) -> tuple[dict[str, Record], set[str], int]:
    """(records, unloaded ids, journal lines) of a store directory: its manifest with its
    journal replayed, read only (AdapterStore folds them at open). StoreError if either is
    unreadable or malformed."""
    state = Path(root) / STATE_DIR
    path = state / MANIFEST
    try:
        raw = json.loads(read_regular_file(path))
    except FileNotFoundError:
        raw = {"version": _VERSION, "adapters": {}, "unloaded": []}
    except (OSError, ValueError) as e:
        raise StoreError(f"adapter manifest {path} is unreadable: {e}") from e
    try:
        if raw["version"] != _VERSION:
            raise ValueError(f"version {raw['version']!r}, expected {_VERSION}")
        records = {str(k): _record(v) for k, v in raw["adapters"].items()}
        unloaded = {str(k) for k in raw["unloaded"]}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise StoreError(f"adapter manifest {path} is malformed: {e}") from e
    path = state / JOURNAL
    try:
        lines = read_regular_file(path).split(b"\n")
    except FileNotFoundError:
        return records, unloaded, 0
    except OSError as e:
        raise StoreError(f"adapter journal {path} is unreadable: {e}") from e
    lines.pop()  # after the last newline: empty, or a line a crash cut short (never acked)
    for n, line in enumerate(lines, 1):
        try:
            change = json.loads(line)
            record = None if change["record"] is None else _record(change["record"])
            _apply(records, unloaded, str(change["id"]), record, bool(change["unloaded"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StoreError(f"adapter journal {path} line {n} is malformed: {e}") from e
    return records, unloaded, len(lines)


def _record(raw: dict) -> Record:
    record = Record(str(raw["sha256"]), str(raw["source"]), int(raw["nbytes"]))
    if not _SHA256.fullmatch(record.sha256):
        raise ValueError("a sha256 is not 64 hex digits")
    return record


def _apply(records: dict[str, Record], unloaded: set[str], adapter_id: str,
           record: Record | None, explicitly_unloaded: bool) -> None:
    """One change: `adapter_id` serves `record` (None: nothing) from now on."""
    unloaded.discard(adapter_id)
    if record is not None:
        records[adapter_id] = record  # a replace keeps the id's place in the order
    else:
        records.pop(adapter_id, None)
        if explicitly_unloaded:
            unloaded.add(adapter_id)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
