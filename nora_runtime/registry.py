"""Adapter registry: adapter id -> slot of the static coefficient table (DESIGN.md s2).

Every table slot but the base (slot 0) is in one of four states:

    free      holds the base coefficients; on the free list
    idle      an id's current slot that no running request holds; in the LRU order
    in use    an id's current slot, held by running requests (refcount > 0)
    retired   no longer any id's slot (replaced or unloaded) but still held by running
              requests; reset to the base and freed when the last of them releases it

Requests hold slots, not ids: `acquire(id)` gives the slot a request's tokens carry for its
whole life and `release(slot)` hands it back (after the request's last step has finished).
So what a running request computes never changes under it: replacing or unloading its adapter
only affects requests that acquire afterwards.

A load reads, validates and merges the adapter (`load_adapter`) on the caller's thread with no
lock held; only the bookkeeping and `table.write` of one slot (L x G x 40 bytes: 10 KiB for an
8B model) happen under the lock, into a slot no running request reads. The forward pass never
takes the lock. On a GPU the write is a blocking host-to-device copy, which waits for the step
in flight; a scheduler calling acquire/release meanwhile waits at most that one step.

Slot allocation (a free-list stack) and LRU eviction (an OrderedDict of idle slots) are O(1),
so a table of >= 100,000 slots costs only its memory (S x L x G x 40 bytes).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from nora_runtime.adapter import (
    MAX_ADAPTER_BYTES,
    AdapterError,
    AdapterMismatchError,
    load_adapter,
)
from nora_runtime.rational import ACTIVATIONS, MODES
from nora_runtime.table import CoefficientTable

BASE_SLOT = 0
INLINE = "inline"  # AdapterInfo.source of adapters given as bytes
# Reserved for content-addressed inline adapters: if `load` accepted such an id, one tenant
# could plant coefficients under the hash of another tenant's bytes and `load_inline` would
# hand them out as a dedupe hit.
INLINE_PREFIX = "sha256:"
MAX_ID_LEN = 128


class AdapterPathError(ValueError):
    """A path source that is absolute, leaves the store directory, or cannot be read
    (the server answers INVALID_ARGUMENT)."""


class GroupCountMismatch(AdapterMismatchError):
    """The adapter's G' groups do not divide the table's G (FAILED_PRECONDITION)."""


class UnsupportedAdapter(AdapterMismatchError):
    """A sound adapter of a kind this server cannot apply: NoRA++ adapters carry LoRA weights
    for linear layers besides their coefficients (FAILED_PRECONDITION). Refused outright, never
    served with the LoRA part silently dropped."""


class AdapterNotFound(KeyError):
    """No adapter is loaded under this id (the server answers NOT_FOUND)."""

    def __str__(self) -> str:  # KeyError's own __str__ would wrap the message in quotes
        return str(self.args[0])


class RegistryFull(RuntimeError):
    """Every slot is held by running requests, so none can be evicted (RESOURCE_EXHAUSTED)."""


@dataclass(frozen=True)
class AdapterInfo:
    """A snapshot of one loaded adapter, for listing and metrics."""

    id: str
    slot: int  # its current slot; requests that acquired before a replace may hold an older one
    nbytes: int  # size of the adapter file
    loaded_at: float  # time.time() of its latest load
    last_used: float  # time.time() of its latest load, acquire or release
    in_use: int  # running requests holding its current slot
    requests: int  # acquires since the id was first loaded (kept across replaces)
    tokens: int  # generated tokens counted for it (count_tokens)
    source: str  # INLINE, or the file's path inside the store directory


@dataclass(slots=True)
class _Entry:
    id: str
    slot: int
    source: str
    nbytes: int
    loaded_at: float
    last_used: float
    requests: int = 0
    tokens: int = 0


class AdapterRegistry:
    """Maps adapter ids to slots of `table`, loading, replacing, unloading and evicting them.

    Adapters are checked against the served model: `fingerprint` (None: not checked), `mode`,
    `act` (one activation kind for all sites), the table's site count and groups. Path sources
    are read only from inside `store_dir` (None: loading by path is disabled). Thread-safe.

    Counters for metrics: `loads`, `evictions`, `load_failures` (bad or mismatched adapters
    and bad paths).
    """

    def __init__(self, table: CoefficientTable, *, fingerprint: str | None, mode: str, act: str,
                 store_dir: str | os.PathLike[str] | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
        self.table = table
        self.fingerprint, self.mode, self.act = fingerprint, mode, act
        self.store_dir = None if store_dir is None else Path(store_dir).resolve()
        n = table.num_slots
        self._lock = threading.Lock()
        self._ids: dict[str, _Entry] = {}
        self._owner: list[_Entry | None] = [None] * n  # whose coefficients each slot holds
        self._refs = [0] * n  # running requests holding each slot
        self._free = list(range(n - 1, 0, -1))  # a stack: pop() hands out low slots first
        self._idle: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self._retired: set[int] = set()
        self.loads = self.evictions = self.load_failures = 0

    @property
    def capacity(self) -> int:
        """Adapter slots (the table's rows besides the base)."""
        return self.table.num_slots - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    def __len__(self) -> int:
        return len(self._ids)

    # ---- loading ------------------------------------------------------------------------------

    def load(self, adapter_id: str, source: bytes | str | os.PathLike[str]) -> AdapterInfo:
        """Load an adapter (file bytes, or a path inside the store directory) under `adapter_id`.

        If the id is loaded already, this replaces it. Requests running with the old version
        keep it to the end: the new coefficients go to another slot and the id switches to it
        atomically, so only requests that acquire afterwards see them; the old slot is freed
        when its last holder releases it. An old version that no request holds is overwritten
        in place instead (indistinguishable, and it costs no eviction).

        Raises ValueError for a bad id, AdapterPathError for a bad path, AdapterError (its
        AdapterMismatchError subclasses when the adapter does not fit this model) for a bad
        adapter, RegistryFull when every slot is in use. On any error nothing changes.
        """
        _check_id(adapter_id)
        if adapter_id.startswith(INLINE_PREFIX):
            raise ValueError(f"adapter ids starting with {INLINE_PREFIX!r} are reserved for "
                             "inline adapters (load_inline)")
        with self._failures_counted():
            data, origin = (source, INLINE) if isinstance(source, bytes) else self._read(source)
            coefs = self._validate(data)
        return self._install(adapter_id, coefs, origin, len(data), dedupe=False)

    def load_inline(self, data: bytes) -> str:
        """Load adapter bytes under their content id "sha256:<hex>" and return that id.

        Bytes loaded already only count as a use (no second slot, no second validation), so
        clients may send the same adapter with every request. Raises as `load` does.
        """
        adapter_id = INLINE_PREFIX + hashlib.sha256(data).hexdigest()
        if not self._touch(adapter_id):
            with self._failures_counted():
                coefs = self._validate(data)
            self._install(adapter_id, coefs, INLINE, len(data), dedupe=True)
        return adapter_id

    def unload(self, adapter_id: str) -> None:
        """Remove `adapter_id` now: new acquires get AdapterNotFound. Requests holding its slot
        keep it; the slot is reset to the base and freed when the last of them releases it."""
        with self._lock:
            entry = self._entry(adapter_id)
            del self._ids[adapter_id]
            if self._refs[entry.slot]:
                self._retired.add(entry.slot)
            else:
                del self._idle[entry.slot]
                self._free_slot(entry.slot)

    # ---- requests -----------------------------------------------------------------------------

    def acquire(self, adapter_id: str | None) -> int:
        """The slot a new request's tokens carry: 0 (the base) for no adapter, else the id's
        current slot, held until `release`. Raises AdapterNotFound for an unknown id."""
        if not adapter_id:
            return BASE_SLOT
        with self._lock:
            entry = self._entry(adapter_id)
            slot = entry.slot
            if self._refs[slot] == 0:
                del self._idle[slot]  # in use: not evictable
            self._refs[slot] += 1
            entry.requests += 1
            entry.last_used = time.time()
            return slot

    def release(self, slot: int) -> None:
        """Hand back a slot from `acquire`, once the request's last step has finished."""
        if slot == BASE_SLOT:
            return
        with self._lock:
            self._check_held(slot)
            self._refs[slot] -= 1
            if self._refs[slot]:
                return
            if slot in self._retired:
                self._retired.remove(slot)
                self._free_slot(slot)
            else:
                self._idle[slot] = None  # most recently used
                self._owner[slot].last_used = time.time()

    def count_tokens(self, slot: int, n: int) -> None:
        """Add `n` generated tokens to the stats of the adapter whose held `slot` this is."""
        if slot == BASE_SLOT:
            return
        with self._lock:
            self._check_held(slot)
            self._owner[slot].tokens += n

    # ---- inspection ---------------------------------------------------------------------------

    def get(self, adapter_id: str) -> AdapterInfo:
        """A snapshot of one adapter; AdapterNotFound if it is not loaded."""
        with self._lock:
            return self._info(self._entry(adapter_id))

    def list(self) -> list[AdapterInfo]:
        """Snapshots of all loaded adapters, in order of first load."""
        with self._lock:
            return [self._info(e) for e in self._ids.values()]

    # ---- internals ----------------------------------------------------------------------------

    @contextmanager
    def _failures_counted(self) -> Iterator[None]:
        try:
            yield
        except (AdapterError, AdapterPathError):
            with self._lock:
                self.load_failures += 1
            raise

    def _read(self, source: str | os.PathLike[str]) -> tuple[bytes, str]:
        """The bytes of a file in the store directory and its path relative to it. Clients
        name files in the operator's store and must reach nothing else; messages repeat only
        the name the client gave, never the server's directories."""
        if self.store_dir is None:
            raise AdapterPathError("loading adapters by path is disabled: no store directory")
        name = os.fspath(source)
        rel = Path(name)
        if not name or "\x00" in name or rel.is_absolute() or ".." in rel.parts:
            raise AdapterPathError(f"adapter path {name!r} must be relative to the store "
                                   "directory, without '..'")
        path = (self.store_dir / rel).resolve()
        if not path.is_relative_to(self.store_dir):
            raise AdapterPathError(f"adapter path {name!r} leads outside the store directory")
        try:
            with open(path, "rb") as f:
                return f.read(MAX_ADAPTER_BYTES + 1), rel.as_posix()  # load_adapter rejects more
        except OSError as e:
            raise AdapterPathError(f"cannot read adapter file {name!r}: {e.strerror}") from e

    def _validate(self, data: bytes) -> torch.Tensor:
        """Merged coefficients [L, G', 10] of adapter bytes that fit the served model."""
        loaded = load_adapter(data, expect_fingerprint=self.fingerprint, expect_mode=self.mode,
                              expect_act=self.act, expect_sites=self.table.num_sites)
        if loaded.lora is not None:
            raise UnsupportedAdapter(
                f"NoRA++ adapters carry LoRA weights ({len(loaded.lora.factors)} linear "
                "modules), which this server cannot serve in mixed batches yet; load a NoRA "
                "adapter (coefficients only)")
        g = loaded.coefs.shape[1]
        if self.table.groups % g:
            raise GroupCountMismatch(f"adapter has groups={g}; the model's {self.table.groups} "
                                     "groups are not a multiple of it")
        return loaded.coefs

    def _install(self, adapter_id: str, coefs: torch.Tensor, source: str, nbytes: int, *,
                 dedupe: bool) -> AdapterInfo:
        with self._lock:
            entry = self._ids.get(adapter_id)
            if entry is not None and dedupe:  # loaded by a racing load_inline meanwhile
                self._touch_entry(entry)
                return self._info(entry)
            slot = self._slot_for(entry)
            self.table.write(slot, coefs)
            now = time.time()
            if entry is None:
                entry = self._ids[adapter_id] = _Entry(adapter_id, slot, source, nbytes, now, now)
            else:
                entry.slot, entry.source, entry.nbytes = slot, source, nbytes
                entry.loaded_at = entry.last_used = now
            self._owner[slot] = entry
            self._idle[slot] = None  # loaded and not yet held: idle, most recently used
            self.loads += 1
            return self._info(entry)

    def _slot_for(self, entry: _Entry | None) -> int:
        """The slot new coefficients for `entry` (None: a new id) go to. An old version that
        no request holds is overwritten in place; one in use retires, kept for its holders."""
        if entry is not None and self._refs[entry.slot] == 0:
            del self._idle[entry.slot]
            return entry.slot
        slot = self._allocate()
        if entry is not None:
            self._retired.add(entry.slot)
        return slot

    def _allocate(self) -> int:
        """A free slot, else the least recently used idle adapter's (evicted); never a held one."""
        if self._free:
            return self._free.pop()
        if not self._idle:
            raise RegistryFull(f"all {self.capacity} adapter slots are held by running requests")
        slot, _ = self._idle.popitem(last=False)
        del self._ids[self._owner[slot].id]
        self.evictions += 1
        return slot

    def _free_slot(self, slot: int) -> None:
        # Reset to the base so that a stale slot index can never read another tenant's adapter.
        self.table.clear(slot)
        self._owner[slot] = None
        self._free.append(slot)

    def _touch(self, adapter_id: str) -> bool:
        with self._lock:
            entry = self._ids.get(adapter_id)
            if entry is not None:
                self._touch_entry(entry)
            return entry is not None

    def _touch_entry(self, entry: _Entry) -> None:
        if entry.slot in self._idle:
            self._idle.move_to_end(entry.slot)
        entry.last_used = time.time()

    def _entry(self, adapter_id: str) -> _Entry:
        entry = self._ids.get(adapter_id)
        if entry is None:
            raise AdapterNotFound(f"no adapter loaded under id {adapter_id!r}")
        return entry

    def _check_held(self, slot: int) -> None:
        if not 0 < slot < len(self._refs) or self._refs[slot] == 0:
            raise ValueError(f"slot {slot} is not held by any request")

    def _info(self, e: _Entry) -> AdapterInfo:
        return AdapterInfo(id=e.id, slot=e.slot, nbytes=e.nbytes, loaded_at=e.loaded_at,
                           last_used=e.last_used, in_use=self._refs[e.slot],
                           requests=e.requests, tokens=e.tokens, source=e.source)


def _check_id(adapter_id: str) -> None:
    if not isinstance(adapter_id, str) or not 0 < len(adapter_id) <= MAX_ID_LEN:
        raise ValueError(f"adapter id must be a non-empty str of at most {MAX_ID_LEN} characters")
    if not adapter_id.isprintable() or any(c.isspace() for c in adapter_id):
        raise ValueError(f"adapter id {adapter_id!r} must be printable, without whitespace")
