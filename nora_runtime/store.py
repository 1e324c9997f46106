"""Durable adapter store: the named adapters of a store directory survive restarts and crashes.

The store directory (`--adapter-dir`) holds the operator's adapter files; nora keeps its own
state beside them, in a hidden folder:

    <store>/*.safetensors                      the operator's files (picked up at startup)
    <store>/.nora/manifest.json                the authority on which id serves what
    <store>/.nora/blobs/<sha256>.safetensors   adapter bytes, content-addressed (deduplicated)
    <store>/.nora/tmp-*                        writes in flight; deleted when the store opens

manifest.json:

    {"version": 1,
     "adapters": {"<id>": {"sha256": "<hex>", "source": "<path in the store, or 'inline'>",
                           "nbytes": <int>}, ...},
     "unloaded": ["<id>", ...]}

An adapter's bytes are copied into a blob at load, so a replace keeps its new content even if
the file it came from changes or goes away. `unloaded` lists ids unloaded explicitly, so that
their `<id>.safetensors` file, if the operator left one, does not bring them back at startup.

Crash safety: every file is written to a temp file, fsynced, renamed over its name, and its
directory fsynced; a blob always before the manifest that names it. A SIGKILL or power cut at
any moment therefore leaves the old manifest or the new one, each naming only complete blobs.
Blobs that no id references are deleted after the manifest that stopped naming them is on disk
(`collect`); one orphaned by a crash in between, and any temp file, is deleted at the next open.

Not thread-safe: the registry serializes every change (AdapterRegistry._persist).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from nora_runtime.adapter import MAX_FILE_BYTES

STATE_DIR = ".nora"
MANIFEST = "manifest.json"
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
        self._records, self._unloaded = self._read_manifest()
        self._sweep()

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
        records, gone = dict(self._records), set(self._unloaded)
        gone.discard(adapter_id)
        if record is not None:
            records[adapter_id] = record  # a replace keeps the id's place in the order
        else:
            records.pop(adapter_id, None)
            if unloaded:
                gone.add(adapter_id)
        self._write_manifest(records, gone)
        self._records, self._unloaded = records, gone

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

    def _read_manifest(self) -> tuple[dict[str, Record], set[str]]:
        path = self.state_dir / MANIFEST
        try:
            raw = json.loads(read_regular_file(path))
        except FileNotFoundError:
            return {}, set()
        except (OSError, ValueError) as e:
            raise StoreError(f"adapter manifest {path} is unreadable: {e}") from e
        try:
            if raw["version"] != _VERSION:
                raise ValueError(f"version {raw['version']!r}, expected {_VERSION}")
            records = {str(k): Record(str(v["sha256"]), str(v["source"]), int(v["nbytes"]))
                       for k, v in raw["adapters"].items()}
            unloaded = {str(k) for k in raw["unloaded"]}
            if not all(_SHA256.fullmatch(r.sha256) for r in records.values()):
                raise ValueError("a sha256 is not 64 hex digits")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StoreError(f"adapter manifest {path} is malformed: {e}") from e
        return records, unloaded

    def _write_manifest(self, records: dict[str, Record], unloaded: set[str]) -> None:
        doc = {"version": _VERSION, "adapters": {k: asdict(r) for k, r in records.items()},
               "unloaded": sorted(unloaded)}
        self._write_atomic(self.state_dir / MANIFEST, json.dumps(doc, indent=1).encode())

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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
