"""Adapter registry: adapter id -> slot of the static coefficient table (DESIGN.md s2).

Two kinds of adapter ids, with separate slot budgets so one kind never crowds out the other:

    named     loaded by `load`: an admin's LoadAdapter, or the store at startup (`restore`; the
              demo adapters too). Pinned: inline traffic never evicts them. With a durable store
              (store.py) a named adapter's bytes are on disk, so when every slot is taken it may
              give its idle slot to another *named* adapter (LRU among idle named ones) and stays
              registered but not resident: its next acquire reloads it from the store. Without a
              durable store a named adapter is never evicted, and a load that finds no free slot
              fails with RegistryFull, changing nothing.
    inline    adapter bytes sent with a request (`hold_inline`), under their content id
              "sha256:<hex>". At most `max_inline` are resident; past that a new one evicts the
              least recently used idle inline adapter, never a named one, and an evicted one is
              forgotten (its next request carries its bytes again). Usable only by sending the
              bytes: `acquire`/`hold` refuse a content id exactly as an unknown id, so holding
              another client's hash gives nothing and reveals nothing. Never persisted.

A named load may evict an idle inline adapter (inline ones are a cache of what requests carry).

Every table slot but the base (slot 0) is in one of four states:

    free      holds the base coefficients; on the free list
    idle      an id's current slot that no running request holds; in its kind's LRU order
              (named ones only with a durable store: the others are never evicted)
    in use    an id's current slot, held by running requests (refcount > 0)
    retired   no longer any id's slot (replaced or unloaded) but still held by running
              requests; reset to the base and freed when the last of them releases it

Requests hold slots, not ids: `hold(id)` / `hold_inline(bytes)` (or `acquire`) give the slot a
request's tokens carry for its whole life and `release(slot)` hands it back after the request's
last step. The hold is taken in the same critical section that loads the adapter, so nothing
can evict an inline adapter between its load and its request's submit. What a running request
computes never changes under it: replacing or unloading its adapter only affects requests that
acquire afterwards.

Failure safety: `table.write` (which checks everything before it copies) comes first and all
bookkeeping after it, so a write that raises leaves every id and slot as they were. A named
load with a durable store writes the store first (the blob, then the manifest); if the install
then fails, the manifest is set back to the id's previous record.

A load reads, validates and merges the adapter (`load_adapter`) on the caller's thread with no
lock held; so does a reload from the store (on the submitting thread, never the engine loop).
Only the bookkeeping and `table.write` of one slot (L x G x 40 bytes: 10 KiB for an 8B model)
happen under the lock, into a slot no running request reads. The forward pass never takes the
lock. On a GPU the write is a blocking host-to-device copy, which waits for the step in flight;
a scheduler calling acquire/release meanwhile waits at most that one step. Store writes (fsync)
happen under a second lock that only loads and unloads take.

Slot allocation (a free-list stack) and LRU eviction (OrderedDicts of idle slots) are O(1), so a
table of >= 100,000 slots costs only its memory (S x L x G x 40 bytes).

Adapter kinds (AdapterInfo.kind), one id namespace and one `load`: "nora" (coefficients: a nora
file), "lora" (a PEFT LoRA: a directory in the store with adapter_config.json and
adapter_model.safetensors, or the packed file `nora_runtime.lora.pack_peft` makes of one, which
is also what the durable store keeps) and "nora++" (a nora file with a LoRA part). Every adapter
holds a table slot, which is what requests hold and tokens carry; an adapter with LoRA also
holds a row of the LoRA pool (`lora_pool`, nora_runtime.lora_pool), bound to its slot
(`LoraPool.bind`): the model reads the row through the slot, and a LoRA adapter without
coefficients reads the base's. Pool rows follow their slot through every state above (a retired
slot keeps its row until released, so a replace never changes a running request's LoRA either)
and have budgets of their own: at most `max_inline_lora` rows hold inline adapters, and when no
row is free a load evicts the least recently used idle adapter holding one (inline ones only for
inline loads; named ones only with a durable store), slot and row together. Writes go table
first, then pool (validated before any write), into a slot and row no running request reads.
"""

from __future__ import annotations

import hashlib
import logging
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
    AdapterError,
    AdapterFormatError,
    AdapterMismatchError,
    UnsupportedAdapter,
    load_adapter,
)
from nora_runtime.histogram import Histogram
from nora_runtime.lora import (
    PEFT_CONFIG,
    PEFT_FORMAT,
    PEFT_WEIGHTS,
    LoraAdapter,
    file_metadata,
    from_lora_weights,
    is_peft_weights,
    pack_peft,
    parse_packed_peft,
)
from nora_runtime.lora_pool import LoraPool
from nora_runtime.rational import ACTIVATIONS, MODES
from nora_runtime.store import BLOB_SUFFIX, AdapterStore, Record, StoreError, read_regular_file
from nora_runtime.table import CoefficientTable

__all__ = ["AdapterHold", "AdapterInfo", "AdapterNotFound", "AdapterPathError",
           "AdapterRegistry", "GroupCountMismatch", "RegistryFull", "UnsupportedAdapter"]

log = logging.getLogger(__name__)

BASE_SLOT = 0
INLINE = "inline"  # AdapterInfo.source of adapters given as bytes
# Reserved for content-addressed inline adapters: if `load` accepted such an id, one tenant
# could plant coefficients under the hash of another tenant's bytes and `hold_inline` would
# hand them out as a dedupe hit.
INLINE_PREFIX = "sha256:"
KINDS = ("nora", "lora", "nora++")  # AdapterInfo.kind
MAX_ID_LEN = 128
# adapter load latency buckets (seconds): a small NoRA file loads in about a millisecond, a LoRA
# of a large model or a slow store takes seconds
LOAD_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        10.0)
_RELOAD_TRIES = 3  # a replace racing a reload makes it read again; more than 3 in a row is a bug


class AdapterPathError(ValueError):
    """A path source that is absolute, leaves the store directory, or cannot be read
    (the server answers INVALID_ARGUMENT)."""


class GroupCountMismatch(AdapterMismatchError):
    """The adapter's G' groups do not divide the table's G (FAILED_PRECONDITION)."""


class AdapterNotFound(KeyError):
    """No adapter is loaded under this id, or the id is an inline adapter's content id, which
    only its bytes can use (the server answers NOT_FOUND)."""

    def __str__(self) -> str:  # KeyError's own __str__ would wrap the message in quotes
        return str(self.args[0])


class RegistryFull(RuntimeError):
    """No slot can be had without evicting what must not be evicted: slots held by running
    requests, named adapters without a durable store, or (for inline adapters) named ones
    and the inline budget (RESOURCE_EXHAUSTED)."""


@dataclass(frozen=True)
class AdapterInfo:
    """A snapshot of one registered adapter, for listing and metrics."""

    id: str
    slot: int  # its current slot (0: not resident); requests from before a replace may hold
    #            an older one
    nbytes: int  # size of the adapter file
    loaded_at: float  # time.time() of its latest load into the table
    last_used: float  # time.time() of its latest load, acquire or release
    in_use: int  # running requests holding its current slot
    requests: int  # acquires since the id was first loaded (kept across replaces)
    tokens: int  # generated tokens counted for it (count_tokens)
    source: str  # INLINE, or the file's path inside the store directory
    inline: bool = False  # an inline adapter (id INLINE_PREFIX + hash): usable only by its bytes
    resident: bool = True  # False: registered, reloaded from the store on its next use
    kind: str = "nora"  # one of KINDS; "" for a stored adapter not loaded since a restart
    lora_rank: int = 0  # the largest rank of its LoRA modules (0: no LoRA)
    lora_targets: tuple[str, ...] = ()  # the projections its LoRA adapts
    lora_row: int = 0  # its current LoRA pool row (0: none)


class AdapterHold:
    """A slot held for a request that is not submitted yet. `take()` hands the hold over to the
    request (which releases the slot when it ends); `release()`, or leaving a `with` block,
    gives it back if it was never taken. Either happens once; later calls do nothing
    (`take` raises)."""

    __slots__ = ("id", "slot", "_registry", "_done")

    def __init__(self, registry: AdapterRegistry, adapter_id: str, slot: int) -> None:
        self.id, self.slot, self._registry, self._done = adapter_id, slot, registry, False

    def take(self) -> int:
        if self._done:
            raise ValueError(f"the hold on adapter {self.id!r} was already taken or released")
        self._done = True
        return self.slot

    def release(self) -> None:
        if not self._done:
            self._done = True
            self._registry.release(self.slot)

    def __enter__(self) -> AdapterHold:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass(slots=True)
class _Entry:
    id: str
    slot: int  # BASE_SLOT: not resident (a stored named adapter, reloaded on its next use)
    source: str
    nbytes: int
    loaded_at: float
    last_used: float
    inline: bool = False
    stored: Record | None = None  # its durable copy; None: memory only
    requests: int = 0
    tokens: int = 0
    kind: str = ""
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Parsed:
    """A validated adapter of any kind: NoRA coefficients [L, G', 10] and/or a LoRA."""

    coefs: torch.Tensor | None
    lora: LoraAdapter | None

    @property
    def kind(self) -> str:
        return "nora" if self.lora is None else "lora" if self.coefs is None else "nora++"


class AdapterRegistry:
    """Maps adapter ids to slots of `table`: loads, replaces, unloads, evicts and reloads them.

    Adapters are checked against the served model: `fingerprint` (None: not checked), `mode`,
    `act` (one activation kind for all sites), the table's site count and groups. Path sources
    are read only from inside `store_dir` (None: loading by path is disabled). With `durable`
    (the default) the named adapters' state lives in `store_dir` (store.py) and survives
    restarts (`restore`); without a store dir, or with durable=False (the demo adapters in the
    read-only package directory), state is memory-only. `max_inline`: inline adapters resident
    at once (None: a quarter of the slots, at least 1; 0: inline adapters refused).
    `lora_pool`: where LoRA and NoRA++ adapters' LoRA goes (None: they are refused, with
    UnsupportedAdapter); `max_inline_lora`: of its rows, those inline adapters may hold (None: a
    quarter, at least 1; 0: inline adapters with LoRA refused). Thread-safe.

    Counters for metrics: `loads`, `evictions` (of which `inline_evictions`), `reloads` (named
    adapters brought back from the store), `load_failures` (bad or mismatched adapters, bad
    paths); `load_seconds`: how long successful loads took (read, validation, store write,
    install), by how they came: "load" (`load`, and restoring the store at startup), "reload"
    (a named adapter brought back from the store on use) and "inline" (`hold_inline`).
    """

    def __init__(self, table: CoefficientTable, *, fingerprint: str | None, mode: str, act: str,
                 store_dir: str | os.PathLike[str] | None = None, durable: bool = True,
                 max_inline: int | None = None, lora_pool: LoraPool | None = None,
                 max_inline_lora: int | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
        self.table = table
        self.fingerprint, self.mode, self.act = fingerprint, mode, act
        self.store_dir = None if store_dir is None else Path(store_dir).resolve()
        self.store = AdapterStore(self.store_dir) if self.store_dir and durable else None
        self.max_inline = max(1, self.capacity // 4) if max_inline is None else max_inline
        if not 0 <= self.max_inline <= self.capacity:
            raise ValueError(f"max_inline must be in [0, {self.capacity}], got {max_inline}")
        self.lora_pool = lora_pool
        rows = lora_pool.capacity if lora_pool is not None else 0
        if lora_pool is not None and len(lora_pool.row) != table.num_slots:
            raise ValueError("lora_pool must map every slot of the table (table_slots)")
        if max_inline_lora is not None and max_inline_lora < 0:
            raise ValueError(f"max_inline_lora must be >= 0, got {max_inline_lora}")
        self.max_inline_lora = (max(1, rows // 4) if max_inline_lora is None
                                else min(max_inline_lora, rows))
        n = table.num_slots
        self._lock = threading.Lock()
        self._persist = threading.Lock()  # orders named loads/unloads: store write + install
        self._ids: dict[str, _Entry] = {}
        self._owner: list[_Entry | None] = [None] * n  # whose coefficients each slot holds
        self._refs = [0] * n  # running requests holding each slot
        self._free = list(range(n - 1, 0, -1))  # a stack: pop() hands out low slots first
        self._idle_inline: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self._idle_named: OrderedDict[int, None] = OrderedDict()  # stored named ones only
        self._retired: set[int] = set()
        self._n_inline = 0  # inline ids registered (all of them resident)
        # LoRA pool rows: the row each slot's adapter holds (0: none), free rows (a stack), and
        # the idle slots holding a row, in LRU order (subsets of the two orders above)
        self._row = [0] * n
        self._free_rows = list(range(rows, 0, -1))
        self._idle_lora_inline: OrderedDict[int, None] = OrderedDict()
        self._idle_lora_named: OrderedDict[int, None] = OrderedDict()
        self._n_inline_lora = 0  # inline ids holding a row
        self.loads = self.evictions = self.inline_evictions = self.reloads = 0
        self.load_failures = 0
        self.load_seconds = {how: Histogram(LOAD_SECONDS_BUCKETS)
                             for how in ("load", "reload", "inline")}

    @property
    def capacity(self) -> int:
        """Adapter slots (the table's rows besides the base)."""
        return self.table.num_slots - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def lora_capacity(self) -> int:
        """LoRA pool rows (0: no pool)."""
        return self.lora_pool.capacity if self.lora_pool is not None else 0

    @property
    def num_free_lora(self) -> int:
        return len(self._free_rows)

    def __len__(self) -> int:
        """Registered ids, resident or not."""
        return len(self._ids)

    # ---- named adapters -----------------------------------------------------------------------

    def load(self, adapter_id: str, source: bytes | str | os.PathLike[str]) -> AdapterInfo:
        """Load a named adapter (file bytes, or a path inside the store directory) under
        `adapter_id`; with a durable store, persist it first. Bytes: a nora file (NoRA or
        NoRA++) or a packed PEFT LoRA (`nora_runtime.lora.pack_peft`); a path: a nora file, a
        PEFT directory (adapter_config.json + adapter_model.safetensors) or its config file.

        If the id is loaded already, this replaces it. Requests running with the old version
        keep it to the end: the new coefficients go to another slot and the id switches to it
        atomically, so only requests that acquire afterwards see them; the old slot is freed
        when its last holder releases it. An old version that no request holds is overwritten
        in place instead (indistinguishable, and it costs no eviction). With a durable store, a
        load that finds every slot held still succeeds: the id is registered, not resident.

        Raises ValueError for a bad id, AdapterPathError for a bad path, AdapterError (its
        AdapterMismatchError subclasses when the adapter does not fit this model) for a bad
        adapter, RegistryFull when no slot can be had (no durable store), OSError when the
        store cannot be written. On any error nothing changes.
        """
        _check_id(adapter_id)
        if adapter_id.startswith(INLINE_PREFIX):
            raise ValueError(f"adapter ids starting with {INLINE_PREFIX!r} are reserved for "
                             "inline adapters")
        start = time.monotonic()
        with self._failures_counted():
            data, origin = (source, INLINE) if isinstance(source, bytes) else self._read(source)
            parsed = self._validate(data)
        with self._persist:
            info = self._load_named(adapter_id, data, parsed, origin)
        self.load_seconds["load"].observe(time.monotonic() - start)
        return info

    def unload(self, adapter_id: str) -> None:
        """Remove `adapter_id` now (and from the durable store, marked unloaded so that its
        file in the store directory does not bring it back at startup): new acquires get
        AdapterNotFound. Requests holding its slot keep it; the slot is reset to the base and
        freed when the last of them releases it."""
        with self._persist:
            with self._lock:
                entry = self._entry(adapter_id)
            before = None
            if self.store is not None and not entry.inline:
                before, _ = self.store.state(adapter_id)
                self.store.set(adapter_id, None, unloaded=True)
            with self._lock:
                self._drop(adapter_id)
            if before is not None:
                self.store.collect(before.sha256)

    def restore(self) -> list[str]:
        """Register the durable store's adapters (after a restart): every id of the manifest,
        resident while free slots last (the rest load on first use), then each top-level
        `*.safetensors` file of the store directory under its name without the suffix, unless
        that id was unloaded explicitly or the manifest has it from elsewhere (a replace wins
        over its old file; a file changed since it was loaded is loaded again). Returns the ids
        registered; an adapter that fails is logged and skipped. No durable store: []."""
        if self.store is None:
            return []
        with self._persist:
            return self._restore_stored() + self._pick_up_files()

    # ---- requests -----------------------------------------------------------------------------

    def hold(self, adapter_id: str) -> AdapterHold:
        """Hold the current slot of the named adapter `adapter_id` for a new request, loading it
        from the durable store first if it is not resident. Raises AdapterNotFound for unknown
        ids and for inline content ids (same message: it reveals nothing), RegistryFull when it
        must be reloaded and no slot can be had, the adapter's errors if its stored copy no
        longer fits the model, StoreError if that copy is unreadable."""
        hold = self._resident(adapter_id, hold=True)
        assert hold is not None
        return hold

    def try_hold(self, adapter_id: str) -> AdapterHold | None:
        """`hold` when the named adapter is resident (no store read: cheap enough for an event
        loop), else None: call `hold` off the loop then. Raises AdapterNotFound as `hold`
        does."""
        with self._lock:
            entry = self._named(adapter_id)
            return self._hold(entry) if entry.slot else None

    def hold_inline(self, data: bytes) -> AdapterHold:
        """Load adapter bytes as an inline adapter (content id "sha256:<hex>") and hold its slot
        for a new request. Bytes resident already only count as a use (no second slot, no
        second validation), so clients may send the same adapter with every request. Raises as
        `load` does; RegistryFull when every inline slot is held (or none can be had)."""
        if not isinstance(data, bytes):
            raise ValueError(f"inline adapter must be bytes, got {type(data).__name__}")
        start = time.monotonic()
        adapter_id = INLINE_PREFIX + hashlib.sha256(data).hexdigest()
        with self._lock:
            if (entry := self._ids.get(adapter_id)) is not None:
                return self._hold(entry)
        with self._failures_counted():
            parsed = self._validate(data)
        with self._lock:
            if (entry := self._ids.get(adapter_id)) is not None:  # a racing hold_inline won
                return self._hold(entry)
            entry = self._install(adapter_id, parsed, source=INLINE, nbytes=len(data),
                                  inline=True, stored=None)
            self.loads += 1
            hold = self._hold(entry)
        self.load_seconds["inline"].observe(time.monotonic() - start)
        return hold

    def load_inline(self, data: bytes) -> str:
        """`hold_inline` without keeping the hold: the content id. The adapter may be evicted
        again before any request uses it; requests should hold it (Engine.submit does)."""
        with self.hold_inline(data) as hold:
            return hold.id

    def acquire(self, adapter_id: str | None) -> int:
        """The slot a new request's tokens carry: 0 (the base) for no adapter, else the named
        adapter's current slot (`hold`), held until `release`."""
        return self.hold(adapter_id).take() if adapter_id else BASE_SLOT

    def release(self, slot: int) -> None:
        """Hand back a held slot, once the request's last step has finished."""
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
                self._make_idle(slot)  # most recently used
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
        """A snapshot of one adapter (inline ones too); AdapterNotFound if not registered."""
        with self._lock:
            return self._info(self._entry(adapter_id))

    def list(self) -> list[AdapterInfo]:
        """Snapshots of all registered adapters (inline ones too: `AdapterInfo.inline` tells
        them apart), in order of first load."""
        with self._lock:
            return [self._info(e) for e in self._ids.values()]

    # ---- loading internals --------------------------------------------------------------------

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
        try:  # (stat raises OSError too: a name too long, say)
            if path.name in (PEFT_CONFIG, PEFT_WEIGHTS) and (path.parent / PEFT_CONFIG).is_file():
                path = path.parent  # a PEFT directory named by one of its two files
            if path.is_dir() and not (path / PEFT_CONFIG).exists():
                raise AdapterPathError(f"cannot read adapter file {name!r}: Is a directory (a "
                                       f"PEFT LoRA directory holds {PEFT_CONFIG})")
            # regular files only: a named pipe would block the read forever
            if path.is_dir():  # a PEFT directory: packed into one file (and one stored blob)
                return pack_peft(path, read=read_regular_file), rel.as_posix()
            return read_regular_file(path), rel.as_posix()  # load_adapter rejects too much
        except OSError as e:
            raise AdapterPathError(f"cannot read adapter file {name!r}: {e.strerror}") from e

    def _validate(self, data: bytes) -> _Parsed:
        """The coefficients [L, G', 10] and/or LoRA of adapter bytes that fit the served model
        (and this server's LoRA pool)."""
        meta = file_metadata(data)
        if meta.get("format") == PEFT_FORMAT:
            parsed = _Parsed(None, parse_packed_peft(data, meta))
        elif is_peft_weights(data, meta):
            raise AdapterFormatError(
                "these are the bytes of a PEFT adapter_model.safetensors alone, without its "
                "adapter_config.json (alpha, rsLoRA, ...): load the PEFT directory by path from "
                "the store, or send the packed file nora_runtime.lora.pack_peft(dir) makes")
        else:
            loaded = load_adapter(data, expect_fingerprint=self.fingerprint,
                                  expect_mode=self.mode, expect_act=self.act,
                                  expect_sites=self.table.num_sites)
            g = loaded.coefs.shape[1]
            if self.table.groups % g:
                raise GroupCountMismatch(f"adapter has groups={g}; the model's "
                                         f"{self.table.groups} groups are not a multiple of it")
            lora = None if loaded.lora is None else from_lora_weights(loaded.lora)
            parsed = _Parsed(loaded.coefs, lora)
        if parsed.lora is not None:
            if self.lora_pool is None:
                raise UnsupportedAdapter(
                    f"{parsed.kind} adapters carry LoRA weights, and this server has no LoRA "
                    "pool (EngineConfig.max_lora_adapters=0): load a NoRA adapter, or give the "
                    "server a LoRA pool")
            self.lora_pool.check(parsed.lora)
        return parsed

    def _load_named(self, adapter_id: str, data: bytes, parsed: _Parsed,
                    origin: str) -> AdapterInfo:
        """Store (durable), then install; on any error both are as they were. Under _persist."""
        if self.store is None:
            with self._lock:
                entry = self._install(adapter_id, parsed, source=origin, nbytes=len(data),
                                      inline=False, stored=None)
                self.loads += 1
                return self._info(entry)
        before = self.store.state(adapter_id)
        record = self.store.add_blob(data, origin)
        self.store.set(adapter_id, record)
        try:
            with self._lock:
                entry = self._install_stored(adapter_id, parsed, record)
                self.loads += 1
                info = self._info(entry)
        except BaseException:
            self._undo_store(adapter_id, before, record)
            raise
        if before[0] is not None:
            self.store.collect(before[0].sha256)
        return info

    def _install_stored(self, adapter_id: str, parsed: _Parsed, record: Record) -> _Entry:
        """Install a stored named adapter; when every slot (or LoRA row) is held, register it
        not resident (its stored copy loads on its next use) instead of failing. Under the
        lock."""
        try:
            return self._install(adapter_id, parsed, source=record.source,
                                 nbytes=record.nbytes, inline=False, stored=record)
        except RegistryFull:
            return self._seat(adapter_id, self._ids.get(adapter_id), BASE_SLOT,
                              source=record.source, nbytes=record.nbytes, inline=False,
                              stored=record, parsed=parsed)

    def _undo_store(self, adapter_id: str, before: tuple[Record | None, bool],
                    record: Record) -> None:
        try:
            self.store.set(adapter_id, before[0], unloaded=before[1])
            self.store.collect(record.sha256)
        except OSError:  # memory keeps the old version; the manifest, the new one until the
            log.exception("adapter %s: cannot restore the store's previous record", adapter_id)

    def _resident(self, adapter_id: str, *, hold: bool) -> AdapterHold | None:
        """Make a named adapter resident, reloading it from the store if it is not; with
        `hold`, hold its slot in the same critical section (an eviction can come between
        otherwise)."""
        start = time.monotonic()
        for _ in range(_RELOAD_TRIES):
            with self._lock:
                entry = self._named(adapter_id)
                if entry.slot:
                    return self._hold(entry) if hold else None
                record = entry.stored
            try:  # read and validate off the lock, as a load does
                data = self.store.read(record)
                with self._failures_counted():
                    parsed = self._validate(data)
            except StoreError:
                with self._lock:
                    if self._named(adapter_id).stored == record:
                        raise
                continue  # replaced meanwhile, and its old blob collected: read the new one
            with self._lock:
                entry = self._named(adapter_id)
                if not entry.slot:
                    if entry.stored != record:
                        continue  # replaced meanwhile: read the new version
                    self._install(adapter_id, parsed, source=record.source,
                                  nbytes=record.nbytes, inline=False, stored=record)
                    if hold:  # on use, after an eviction (at startup: a load)
                        self.reloads += 1
                        log.info("adapter %s reloaded from the store into slot %d",
                                 adapter_id, entry.slot)
                    else:
                        self.loads += 1
                    self.load_seconds["reload" if hold else "load"].observe(
                        time.monotonic() - start)
                return self._hold(entry) if hold else None
        raise StoreError(f"adapter {adapter_id!r} was replaced {_RELOAD_TRIES} times while it "
                         "was being reloaded")

    def _restore_stored(self) -> list[str]:
        ids = []
        with self._lock:
            for adapter_id, record in self.store.records().items():
                if adapter_id not in self._ids:
                    self._seat(adapter_id, None, BASE_SLOT, source=record.source,
                               nbytes=record.nbytes, inline=False, stored=record)
                    ids.append(adapter_id)
        failed = set()
        for adapter_id in ids:  # resident while free slots last: first requests need no reload
            if not self._free:
                break
            try:
                self._resident(adapter_id, hold=False)
            except Exception as exc:  # e.g. served with another model now: the manifest keeps
                log.error("stored adapter %s not restored: %s", adapter_id, exc)  # the record
                failed.add(adapter_id)
                with self._lock:
                    self._drop(adapter_id)
        return [i for i in ids if i not in failed]

    def _pick_up_files(self) -> list[str]:
        """Load the store directory's new or changed top-level files (restore's second part)."""
        ids = []
        for path in sorted(self.store_dir.glob(f"*{BLOB_SUFFIX}")):
            adapter_id, name = path.stem, path.name
            record = self.store.get(adapter_id)
            if self.store.is_unloaded(adapter_id) or (record and record.source != name):
                continue
            try:
                _check_id(adapter_id)
                with self._failures_counted():
                    data, origin = self._read(name)
                    if record and hashlib.sha256(data).hexdigest() == record.sha256:
                        continue  # restored already
                    parsed = self._validate(data)
                self._load_named(adapter_id, data, parsed, origin)
            except Exception as exc:  # one bad file must not keep the others from serving
                log.error("adapter file %s not loaded: %s", name, exc)
                continue
            if record is None:
                ids.append(adapter_id)
        return ids

    # ---- slot bookkeeping (all under the lock) ------------------------------------------------

    def _install(self, adapter_id: str, parsed: _Parsed, *, source: str, nbytes: int,
                 inline: bool, stored: Record | None) -> _Entry:
        """Write an adapter to a slot (and its LoRA to a pool row) for `adapter_id` and make it
        the id's current (idle) slot. The writes go first (the table's, which checks everything
        before it copies, then the pool's, checked in `_validate`): if the table write raises,
        no id, slot or row has changed."""
        entry = self._ids.get(adapter_id)
        slot, evict = self._place(entry, inline)
        in_place = not evict and entry is not None and entry.slot == slot
        row, row_victim, from_free = 0, None, False
        if parsed.lora is not None:
            row, row_victim, from_free = self._place_row(
                inline, self._row[slot] if evict or in_place else 0)
        if parsed.coefs is not None:
            self.table.write(slot, parsed.coefs)
        if parsed.lora is not None:
            self.lora_pool.write(row, parsed.lora)
        if parsed.coefs is None:  # a LoRA alone reads the base coefficients (LoraPool.bind);
            self.table.clear(slot)  # its own slot holds them too, as a free slot does
        old_row = self._row[slot]
        if from_free:
            self._free_rows.pop()  # _place_row handed out the top of the stack
        if evict:
            self._evict(slot)
        elif in_place:  # the idle old version, overwritten
            self._unidle(slot)
        else:
            self._free.pop()  # _place handed out the top of the stack
        if row_victim is not None:  # gives its row (now ours), and with it its slot
            self._evict(row_victim)
            self._row[row_victim] = 0
            self.lora_pool.bind(row_victim, 0, lora_only=False)
            self._free_slot(row_victim)
        if old_row != row:
            self._unbind_row(slot)
        self._row[slot] = row
        if self.lora_pool is not None:
            self.lora_pool.bind(slot, row, lora_only=parsed.coefs is None)
        entry = self._seat(adapter_id, entry, slot, source=source, nbytes=nbytes, inline=inline,
                           stored=stored, parsed=parsed)
        self._make_idle(slot)
        return entry

    def _place_row(self, inline: bool, reusable: int) -> tuple[int, int | None, bool]:
        """(pool row, the idle slot whose adapter gives it up or None, whether the row is the
        top of the free stack) for a new adapter's LoRA; changes nothing. `reusable`: the row
        of the slot being overwritten (its old version's, or its evicted adapter's), taken
        first. Inline adapters evict only inline
        ones; named ones, inline ones first (then stored named ones, as `_place`)."""
        if reusable:
            return reusable, None, False
        if inline and self._n_inline_lora >= self.max_inline_lora:
            if self._idle_lora_inline:
                victim = next(iter(self._idle_lora_inline))
                return self._row[victim], victim, False
            raise RegistryFull("inline adapters with LoRA are disabled on this server" if not
                               self.max_inline_lora else f"all {self.max_inline_lora} inline "
                               "LoRA pool rows are held by running requests; retry later")
        if self._free_rows:
            return self._free_rows[-1], None, True
        lrus = ((self._idle_lora_inline,) if inline
                else (self._idle_lora_inline, self._idle_lora_named))
        for lru in lrus:
            if lru:
                victim = next(iter(lru))
                return self._row[victim], victim, False
        raise RegistryFull(f"all {self.lora_capacity} LoRA pool rows are held by running "
                           "requests " + ("or named adapters" if inline else
                                          "or pinned adapters"))

    def _unbind_row(self, slot: int) -> None:
        """Give the pool row of `slot` back (none: nothing to do)."""
        row = self._row[slot]
        if row:
            self._row[slot] = 0
            self._free_rows.append(row)
            self.lora_pool.bind(slot, 0, lora_only=False)

    def _place(self, entry: _Entry | None, inline: bool) -> tuple[int, bool]:
        """(slot, whether its idle adapter is evicted) for new coefficients of `entry` (None: a
        new id); changes nothing. An old version that no request holds is overwritten in
        place. Inline adapters evict only inline ones; named ones, inline ones first."""
        if entry is not None and entry.slot and not self._refs[entry.slot]:
            return entry.slot, False
        if inline and self._n_inline >= self.max_inline:
            if self._idle_inline:
                return next(iter(self._idle_inline)), True
            raise RegistryFull("inline adapters are disabled on this server" if not
                               self.max_inline else f"all {self.max_inline} inline adapter "
                               "slots are held by running requests; retry later")
        if self._free:
            return self._free[-1], False
        for lru in (self._idle_inline,) if inline else (self._idle_inline, self._idle_named):
            if lru:
                return next(iter(lru)), True
        raise RegistryFull(f"all {self.capacity} adapter slots are held by running requests "
                           + ("or named adapters" if inline else "or pinned adapters"))

    def _seat(self, adapter_id: str, entry: _Entry | None, slot: int, *, source: str,
              nbytes: int, inline: bool, stored: Record | None,
              parsed: _Parsed | None = None) -> _Entry:
        """Make `slot` (BASE_SLOT: none) the id's current one; an old slot retires. `parsed`:
        what it serves (None: not known until it is loaded)."""
        now = time.time()
        if entry is None:
            entry = self._ids[adapter_id] = _Entry(adapter_id, BASE_SLOT, source, nbytes, now,
                                                   now, inline=inline)
            self._n_inline += inline
        elif entry.slot and entry.slot != slot:  # held by running requests (an idle one is
            self._retired.add(entry.slot)  # overwritten in place): theirs until released
        entry.slot, entry.source, entry.nbytes, entry.stored = slot, source, nbytes, stored
        entry.loaded_at = entry.last_used = now
        if parsed is not None:
            entry.kind = parsed.kind
            lora = parsed.lora
            entry.lora_rank = lora.rank if lora else 0
            entry.lora_targets = lora.targets if lora else ()
        if entry.inline and slot and self._row[slot]:
            self._n_inline_lora += 1
        if slot:
            self._owner[slot] = entry
        return entry

    def _evict(self, slot: int) -> None:
        """Take an idle slot from its adapter: an inline one is forgotten, a stored named one
        stays registered (reloaded on its next use)."""
        victim = self._owner[slot]
        self._unidle(slot)
        self._owner[slot] = None
        self.evictions += 1
        if victim.inline:
            del self._ids[victim.id]
            self._n_inline -= 1
            self._n_inline_lora -= bool(self._row[slot])
            self.inline_evictions += 1
        else:
            victim.slot = BASE_SLOT
        log.info("adapter %s evicted from slot %d%s", victim.id, slot,
                 "" if victim.inline else " (reloaded from the store on its next use)")

    def _drop(self, adapter_id: str) -> None:
        """Forget an id (gone already: nothing to do); its slot is freed now or, if held,
        retired until its holders release it."""
        entry = self._ids.pop(adapter_id, None)
        if entry is None:
            return
        self._n_inline -= entry.inline
        self._n_inline_lora -= entry.inline and bool(self._row[entry.slot])
        if not entry.slot:
            return
        if self._refs[entry.slot]:
            self._retired.add(entry.slot)
        else:
            self._unidle(entry.slot)
            self._free_slot(entry.slot)

    def _hold(self, entry: _Entry) -> AdapterHold:
        slot = entry.slot
        if not self._refs[slot]:
            self._unidle(slot)  # in use: not evictable
        self._refs[slot] += 1
        entry.requests += 1
        entry.last_used = time.time()
        return AdapterHold(self, entry.id, slot)

    def _lru(self, entry: _Entry) -> OrderedDict[int, None] | None:
        """The LRU order an idle slot of `entry` joins; None: never evicted (memory only)."""
        if entry.inline:
            return self._idle_inline
        return self._idle_named if entry.stored is not None else None

    def _make_idle(self, slot: int) -> None:
        entry = self._owner[slot]
        lru = self._lru(entry)
        if lru is not None:
            lru[slot] = None  # most recently used
            if self._row[slot]:
                (self._idle_lora_inline if entry.inline else self._idle_lora_named)[slot] = None

    def _unidle(self, slot: int) -> None:
        lru = self._lru(self._owner[slot])
        if lru is not None:
            lru.pop(slot, None)
            self._idle_lora_inline.pop(slot, None)
            self._idle_lora_named.pop(slot, None)

    def _free_slot(self, slot: int) -> None:
        # Reset to the base (and no LoRA row) so that a stale slot index can never read another
        # tenant's adapter.
        self.table.clear(slot)
        self._unbind_row(slot)
        self._owner[slot] = None
        self._free.append(slot)

    def _entry(self, adapter_id: str) -> _Entry:
        entry = self._ids.get(adapter_id)
        if entry is None:
            raise AdapterNotFound(f"no adapter loaded under id {adapter_id!r}")
        return entry

    def _named(self, adapter_id: str) -> _Entry:
        """A named adapter's entry. An inline content id gets the unknown id's answer: using
        another client's adapter takes its bytes, and the answer must not say it is loaded."""
        entry = self._ids.get(adapter_id)
        if entry is None or entry.inline:
            raise AdapterNotFound(f"no adapter loaded under id {adapter_id!r}")
        return entry

    def _check_held(self, slot: int) -> None:
        if not 0 < slot < len(self._refs) or self._refs[slot] == 0:
            raise ValueError(f"slot {slot} is not held by any request")

    def _info(self, e: _Entry) -> AdapterInfo:
        return AdapterInfo(id=e.id, slot=e.slot, nbytes=e.nbytes, loaded_at=e.loaded_at,
                           last_used=e.last_used, in_use=self._refs[e.slot] if e.slot else 0,
                           requests=e.requests, tokens=e.tokens, source=e.source,
                           inline=e.inline, resident=bool(e.slot), kind=e.kind,
                           lora_rank=e.lora_rank, lora_targets=e.lora_targets,
                           lora_row=self._row[e.slot] if e.slot else 0)


def _check_id(adapter_id: str) -> None:
    if not isinstance(adapter_id, str) or not 0 < len(adapter_id) <= MAX_ID_LEN:
        raise ValueError(f"adapter id must be a non-empty str of at most {MAX_ID_LEN} characters")
    if not adapter_id.isprintable() or any(c.isspace() for c in adapter_id):
        raise ValueError(f"adapter id {adapter_id!r} must be printable, without whitespace")
