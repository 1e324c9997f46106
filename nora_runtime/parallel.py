"""Tensor parallelism (issue 14): one model over N processes, one per device, Megatron style.

    rank 0 (the engine's process): scheduler, registry, sampling, and its share of the model
    ranks 1..N-1 (worker processes it spawns): their share of the model, nothing else

Every rank holds a slice of each decoder layer: the column-parallel fused projections qkv_proj
(q | k | v) and gate_up_proj (gate | up), each section split on its own (a share of the query
heads, of the KV heads, of the MLP channels), row-parallel o_proj and down_proj (the matching
input slice; one all-reduce each per layer sums the partial outputs). Attention heads and the
KV cache split by KV head; with more ranks than KV heads, ranks share (replicate) one. The
embedding and lm_head are vocab-parallel, the only kind under tensor parallelism: replicated,
a 70B Llama's 128k x 8k embedding and head (2 GiB each in bf16) would cost every rank 4 GiB,
split they cost 4/N; the price is one more all-reduce a step ([N, H], like each layer's two)
and a gather of the sampled rows' logits, and keeping the replicated kind beside it would be
more code, not less. Each rank holds a contiguous slice of the vocabulary's rows (vocab_slice:
ceil(V / N) rows a rank, the last one fewer when N does not divide V); tied embeddings share
the slice. The embedding looks up the ids in its slice, zeros the others and all-reduces
[N, H]; the head computes its slice of the sampled rows' logits [B', V / N] and rank 0 gathers
them into [B', V] (a gather, not an all-gather: only rank 0 samples). The norms are
replicated. The model file knows only the layers' kind (`Linears`, DESIGN.md s4).

NoRA needs no sharding: every rank keeps the whole coefficient table (KBs per adapter) and
receives every write; a rank's activation reads only the groups its MLP channels fall in
(`TableShard`). The LoRA pool is sharded with the projections (`ShardedLoraPool`); each LoRA
load is sent to every rank, which keeps its slice.

Rank 0 sends commands, in one order, through a gloo group: each step's ForwardBatch (CPU
copies of its tensors, pickled), each coefficient-table and LoRA-pool write, and stop. A worker
runs them in order and exits on any error, so ranks never diverge silently. Failure is loud and
bounded: a dead rank breaks the TCP connections (gloo reports it in milliseconds), every
collective of a step has a timeout (NORA_TP_TIMEOUT seconds), rank 0 watches its workers'
processes, and workers exit when rank 0's process goes away. Any of these marks the group
broken; the engine then stops (health NOT_SERVING, nora-serve exits non-zero).

On GPUs the model's all-reduces run on NCCL (NVLink multicast off: NCCL_NVLS_ENABLE=0), the
commands still on gloo. CUDA graphs are not captured with tensor parallelism yet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nora_runtime.lora import LoraAdapter, LoraModule
from nora_runtime.lora_pool import LoraPool
from nora_runtime.table import CoefficientTable

log = logging.getLogger(__name__)

# a step's collectives (and a command's delivery) must finish within this many seconds
TIMEOUT = float(os.environ.get("NORA_TP_TIMEOUT", "60"))
STARTUP_TIMEOUT = 1800.0  # workers join, load their shards and size their KV caches
IDLE_TIMEOUT = 365 * 86400.0  # a worker waits this long for the next command (an idle server)


# ---- the linear layers' kind (all the model file knows of parallelism) ---------------------------

Part = tuple[int, int | None]  # one projection of a column layer: (n_out, heads or None)


class FusedLinear(nn.Linear):
    """nn.Linear whose output is projections concatenated along the output features, `sections`
    of them each (q | k | v: y.split(sections, dim=-1) gives views of each)."""

    def __init__(self, n_in: int, sections: list[int], *, bias: bool) -> None:
        super().__init__(n_in, sum(sections), bias=bias)
        self.sections = sections


class Linears:
    """Builds a model's linear layers (and its embedding and lm_head); this one, for a single
    process, plain nn.Linear (FusedLinear for column) and nn.Embedding.

    column(n_in, parts, kv_heads=): a FusedLinear of the projections `parts`, each (n_out,
    heads), concatenated; each process computes a share of each part's outputs: by its `heads`
    attention heads, which go to processes by the `kv_heads` KV heads they attend with
    (head_slice), or (heads None) in equal parts. q | k | v: [(nh * d, nh), (nkv * d, nkv),
    (nkv * d, nkv)] over nkv KV heads; gate | up: [(I, None), (I, None)].
    row(n_in, n_out, heads=, kv_heads=): each process reads the share of the inputs that a
    column-parallel layer before it computed; the partial outputs are summed across processes.
    embedding(vocab, dim) / head(dim, vocab): the token embedding and the lm_head (logits
    [B', vocab] on the process that samples); tying the head's weight to the embedding's must
    keep working (both split the vocabulary alike).
    """

    def column(self, n_in: int, parts: list[Part], *, bias: bool = False,
               kv_heads: int | None = None) -> FusedLinear:
        return FusedLinear(n_in, [n for n, _ in parts], bias=bias)

    def row(self, n_in: int, n_out: int, *, bias: bool = False, heads: int | None = None,
            kv_heads: int | None = None) -> nn.Linear:
        return nn.Linear(n_in, n_out, bias=bias)

    def embedding(self, vocab: int, dim: int) -> nn.Embedding:
        return nn.Embedding(vocab, dim)

    def head(self, dim: int, vocab: int) -> nn.Linear:
        return nn.Linear(dim, vocab, bias=False)


DENSE = Linears()


def vocab_slice(vocab: int, rank: int, size: int) -> slice:
    """The vocabulary rows `rank` of `size` holds: ceil(vocab / size) each, the last rank the
    rest (fewer when size does not divide vocab), so that the gathered logits of ranks 0..N-1
    are the vocabulary in order once cut to `vocab` columns."""
    per = -(-vocab // size)
    if (size - 1) * per >= vocab:
        raise ValueError(f"vocab_size={vocab} leaves a rank no rows over "
                         f"tensor_parallel_size={size}")
    return slice(rank * per, min(vocab, (rank + 1) * per))


def head_slice(heads: int, kv_heads: int, rank: int, size: int) -> slice:
    """The heads (of `heads`, grouped over `kv_heads` KV heads; heads == kv_heads for the KV
    projections themselves) that `rank` of `size` computes. With at least as many KV heads as
    ranks, each rank takes whole KV groups, as evenly as they go (SmolLM2-135M's 3 KV heads
    over 2 ranks: 1 and 2); with fewer, ranks share a KV head (replicated) and split its
    query heads."""
    g = heads // kv_heads  # query heads per KV head (1: the KV projections)
    if heads % kv_heads:
        raise ValueError(f"{heads} heads do not group over {kv_heads} KV heads")
    if kv_heads >= size:
        return slice(rank * kv_heads // size * g, (rank + 1) * kv_heads // size * g)
    share = size // kv_heads  # ranks per KV head
    if size % kv_heads or (g > 1 and g % share):
        raise ValueError(f"{heads} heads over {kv_heads} KV heads do not split over "
                         f"tensor_parallel_size={size}")
    kv = rank // share
    if g == 1:
        return slice(kv, kv + 1)
    per = g // share
    start = kv * g + rank % share * per
    return slice(start, start + per)


def shard_slice(n: int, rank: int, size: int, heads: int | None, kv_heads: int | None) -> slice:
    """Rank's slice of n features: by heads (head_slice) or in equal parts."""
    if heads is not None:
        unit = n // heads
        h = head_slice(heads, kv_heads or heads, rank, size)
        return slice(h.start * unit, h.stop * unit)
    if n % size:
        raise ValueError(f"{n} features do not split over tensor_parallel_size={size}")
    return slice(rank * n // size, (rank + 1) * n // size)


class ColumnParallelLinear(FusedLinear):
    """This rank's rows of a column-parallel layer (Linears.column): `sections` are the local
    counts; rows[i] is the slice of part i's checkpoint rows that this rank holds."""

    def __init__(self, n_in: int, parts: list[Part], *, bias: bool, rank: int, size: int,
                 kv_heads: int | None = None) -> None:
        self.rows = [shard_slice(n, rank, size, heads, kv_heads) for n, heads in parts]
        super().__init__(n_in, [r.stop - r.start for r in self.rows], bias=bias)

    def shard_index(self, name: str, section: int | None) -> tuple[slice, ...]:
        return (self.rows[section],)  # weight rows and bias entries alike


class RowParallelLinear(nn.Linear):
    """This rank's input columns of a row-parallel projection (Linears.row); the forward
    all-reduces the partial products (the bias, replicated, is added once after)."""

    def __init__(self, n_in: int, n_out: int, *, bias: bool, group: Group,
                 heads: int | None = None, kv_heads: int | None = None) -> None:
        self.cols = shard_slice(n_in, group.rank, group.size, heads, kv_heads)
        super().__init__(self.cols.stop - self.cols.start, n_out, bias=bias)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)  # [N, out], this rank's partial sum
        self.group.all_reduce(y)
        return y if self.bias is None else y + self.bias

    def shard_index(self, name: str, section: int | None) -> tuple[slice, ...]:
        return (slice(None), self.cols) if name == "weight" else ()


class VocabParallelEmbedding(nn.Embedding):
    """This rank's rows `rows` of the token embedding (Linears.embedding): ids outside them
    look up zeros, and the all-reduce sums every rank's rows into the whole embedding."""

    def __init__(self, vocab: int, dim: int, *, group: Group) -> None:
        self.rows = vocab_slice(vocab, group.rank, group.size)
        super().__init__(self.rows.stop - self.rows.start, dim)
        self.group = group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.rows.start  # [N]
        outside = (local < 0) | (local >= self.num_embeddings)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)  # [N, H]
        x.masked_fill_(outside[:, None], 0)
        self.group.all_reduce(x)
        return x

    def shard_index(self, name: str, section: int | None) -> tuple[slice, ...]:
        return (self.rows,)


class VocabParallelHead(nn.Linear):
    """This rank's vocabulary rows of the lm_head (Linears.head): the forward computes their
    logits and gathers every rank's to rank 0, which gets [B', vocab]; the other ranks get
    their own slice [B', rows]."""

    def __init__(self, dim: int, vocab: int, *, group: Group) -> None:
        self.rows = vocab_slice(vocab, group.rank, group.size)
        super().__init__(dim, self.rows.stop - self.rows.start, bias=False)
        self.group, self.vocab = group, vocab

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)  # [B', rows]
        per = -(-self.vocab // self.group.size)
        if y.shape[1] < per:  # the last rank's slice, padded: gathers take equal shapes
            y = F.pad(y, (0, per - y.shape[1]))
        parts = self.group.gather(y.contiguous())
        return y if parts is None else torch.cat(parts, dim=1)[:, :self.vocab]

    def shard_index(self, name: str, section: int | None) -> tuple[slice, ...]:
        return (self.rows,)


class ParallelLinears(Linears):
    """Linears (and embedding, head) of one rank of a tensor-parallel group."""

    def __init__(self, group: Group) -> None:
        self.group = group

    def column(self, n_in: int, parts: list[Part], *, bias: bool = False,
               kv_heads: int | None = None) -> FusedLinear:
        return ColumnParallelLinear(n_in, parts, bias=bias, rank=self.group.rank,
                                    size=self.group.size, kv_heads=kv_heads)

    def row(self, n_in: int, n_out: int, *, bias: bool = False, heads: int | None = None,
            kv_heads: int | None = None) -> nn.Linear:
        return RowParallelLinear(n_in, n_out, bias=bias, group=self.group, heads=heads,
                                 kv_heads=kv_heads)

    def embedding(self, vocab: int, dim: int) -> nn.Embedding:
        return VocabParallelEmbedding(vocab, dim, group=self.group)

    def head(self, dim: int, vocab: int) -> nn.Linear:
        return VocabParallelHead(dim, vocab, group=self.group)


def load_weights_sharded(model: nn.Module, path: Path) -> None:
    """llama.load_weights for a tensor-parallel rank: each parallel layer reads only its slice
    of the checkpoint's tensors (safetensors slices: no full copy of a 70B projection)."""
    from nora_runtime.llama import load_weights

    modules = dict(model.named_modules())

    def index(target: str, section: int | None) -> tuple:
        owner, _, leaf = target.rpartition(".")
        shard = getattr(modules[owner], "shard_index", None)
        return () if shard is None else shard(leaf, section)

    load_weights(model, path, index=index)


def projection_slices(hf_config, rank: int, size: int) -> dict[str, tuple[str, slice]]:
    """What `rank` computes of each projection, as llama.py's layers split them: ("column",
    its output rows: q/k/v and gate/up, those of its section of the fused layer) or ("row", its
    input columns)."""
    H, I = hf_config.hidden_size, hf_config.intermediate_size
    nh, nkv = hf_config.num_attention_heads, hf_config.num_key_value_heads
    d = getattr(hf_config, "head_dim", None) or H // nh
    q = shard_slice(nh * d, rank, size, nh, nkv)
    kv = shard_slice(nkv * d, rank, size, nkv, nkv)
    mlp = shard_slice(I, rank, size, None, None)
    return {"q_proj": ("column", q), "k_proj": ("column", kv), "v_proj": ("column", kv),
            "o_proj": ("row", q), "gate_proj": ("column", mlp), "up_proj": ("column", mlp),
            "down_proj": ("row", mlp)}


class ShardedLoraPool(LoraPool):
    """One rank's LoRA pool. Column-parallel projections keep B's rows of this rank's outputs
    (A whole): each rank adds its outputs' deltas. Row-parallel ones keep A and B whole and
    gather their input from all ranks first (one all-reduce of [N, in], in steps with LoRA
    tokens only), so every rank adds the same whole delta to the summed output. Adapters are
    checked against the whole model's shapes; rank 0's pool sends each write to the workers."""

    def __init__(self, *, group: Group, slices: dict[str, tuple[str, slice]],
                 shapes: dict[str, tuple[int, int]], leader: Leader | None = None,
                 **kwargs) -> None:
        local = {m: (n_in, n_out if slices[m][0] == "row" else len(range(n_out)[slices[m][1]]))
                 for m, (n_in, n_out) in shapes.items()}
        super().__init__(shapes=local, **kwargs)
        self.shapes = {m: shapes[m] for m in self.targets}  # what adapters must fit
        self.group, self.slices, self._leader = group, slices, leader

    def write(self, row: int, lora: LoraAdapter) -> None:
        if self._leader is None:
            return super().write(row, lora)
        self.check(lora)  # a bad adapter never reaches the workers
        with self._leader._command(("lora", row, lora)):
            super().write(row, lora)

    def _write(self, row: int, lora: LoraAdapter) -> None:
        modules = {}
        for (l, m), mod in lora.modules.items():
            kind, part = self.slices[m]
            modules[l, m] = mod if kind == "row" else LoraModule(mod.A, mod.B[part], mod.scale)
        super()._write(row, LoraAdapter(modules, lora.source, lora.config))

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, module: str,
              rows: torch.Tensor) -> None:
        kind, part = self.slices[module]
        if kind == "row":  # x: this rank's input columns [N, in / N] -> all of them [N, in]
            whole = x.new_zeros(x.shape[0], self.shapes[module][0])
            whole[:, part] = x
            self.group.all_reduce(whole)
            x = whole
        super().apply(y, x, layer, module, rows)


class TableShard:
    """What one rank's MLP activations read of the (whole, replicated) coefficient table: the
    groups its channels fall in. Contiguous channel groups (DESIGN.md s1) and contiguous channel
    shards line up when the ranks divide the groups or the groups divide the ranks."""

    def __init__(self, table: CoefficientTable, rank: int, size: int) -> None:
        G = table.groups
        if G % size and size % G:
            raise ValueError(f"rational groups ({G}) and tensor_parallel_size ({size}) must "
                             "divide one another")
        self.table = table
        self.g0 = rank * G // size
        self.g1 = self.g0 + max(1, G // size)

    def site(self, l: int) -> torch.Tensor:
        return self.table.data[:, l, self.g0:self.g1]  # [S, G / N, 10], rows contiguous


# ---- the process group --------------------------------------------------------------------------


def rank_device(name: str, rank: int) -> torch.device:
    """Rank r's device: the CPU, or the r-th CUDA device from the configured one."""
    from nora_runtime.model_runner import resolve_device

    device = resolve_device(name)
    return device if device.type != "cuda" else torch.device("cuda", device.index + rank)


class Group:
    """One rank's view of the group: gloo for commands (and, on the CPU, for the model's
    all-reduces), NCCL for the model's all-reduces on GPUs."""

    def __init__(self, rank: int, size: int, store, device: torch.device) -> None:
        self.rank, self.size, self.device = rank, size, device
        self.linears = ParallelLinears(self)
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timedelta(seconds=TIMEOUT)
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        self.cpu = dist.ProcessGroupGloo(dist.PrefixStore("gloo", store), rank, size, opts)
        self.dev = self.cpu
        if device.type == "cuda":
            os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast off (issue 14), before init
            torch.cuda.set_device(device)
            nccl = dist.ProcessGroupNCCL  # CUDA builds of torch only
            nopts = nccl.Options()
            nopts._timeout = timedelta(seconds=TIMEOUT)
            self.dev = nccl(dist.PrefixStore("nccl", store), rank, size, nopts)

    def all_reduce(self, t: torch.Tensor, timeout: float | None = None) -> None:
        """Sum `t` over the ranks, in place."""
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        if timeout is not None:
            opts.timeout = timedelta(seconds=timeout)
        self.dev.allreduce([t], opts).wait()

    def gather(self, t: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `t` (one shape on all) on rank 0, in rank order; None elsewhere."""
        out = [[torch.empty_like(t) for _ in range(self.size)]] if self.rank == 0 else []
        opts = dist.GatherOptions()
        opts.rootRank = 0
        self.dev.gather(out, [t], opts).wait()
        return out[0] if self.rank == 0 else None

    def gather_object(self, obj):
        """Every rank's `obj` on rank 0, in rank order (pickled, on gloo); None elsewhere."""
        data = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=5)), dtype=torch.uint8)
        longest = -self.min_int(-data.numel())  # gathers take equal shapes: pad to it
        sent = [torch.tensor([data.numel()]), F.pad(data, (0, longest - data.numel()))]
        opts = dist.GatherOptions()
        opts.rootRank = 0
        got = []
        for t in sent:  # lengths, then the padded bytes
            out = [[torch.empty_like(t) for _ in range(self.size)]] if self.rank == 0 else []
            self.cpu.gather(out, [t], opts).wait()
            got.append(out[0] if self.rank == 0 else None)
        if self.rank != 0:
            return None
        return [pickle.loads(b[:int(n)].numpy().tobytes()) for n, b in zip(*got, strict=True)]

    def min_int(self, n: int) -> int:
        """The smallest of every rank's n (after loading: bounded by STARTUP_TIMEOUT)."""
        t = torch.tensor([-n], dtype=torch.long)  # max of -n: gloo and NCCL both have MAX
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        opts.timeout = timedelta(seconds=STARTUP_TIMEOUT)
        self.cpu.allreduce([t], opts).wait()
        return -int(t.item())

    def same(self, value: int) -> bool:
        """Whether every rank passed the same value."""
        t = torch.tensor([value, -value], dtype=torch.long)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        self.cpu.allreduce([t], opts).wait()
        return int(t[0]) == -int(t[1])

    def broadcast_object(self, obj=None, timeout: float = TIMEOUT):
        """Rank 0's `obj` on every rank (pickled; two broadcasts: size, bytes)."""
        wait = timedelta(seconds=timeout)
        if self.rank == 0:
            data = torch.frombuffer(bytearray(pickle.dumps(obj, protocol=5)), dtype=torch.uint8)
            size = torch.tensor([data.numel()], dtype=torch.long)
        else:
            size = torch.zeros(1, dtype=torch.long)
        self.cpu.broadcast(size, 0, timeout=wait).wait()
        if self.rank != 0:
            data = torch.empty(int(size.item()), dtype=torch.uint8)
        self.cpu.broadcast(data, 0, timeout=wait).wait()
        return obj if self.rank == 0 else pickle.loads(data.numpy().tobytes())


def _map_tensors(obj, fn):
    """obj with fn applied to every tensor in it (dataclass fields, lists, tuples)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(x, fn) for x in obj)
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: _map_tensors(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj)})
    return obj


def digest(table: CoefficientTable) -> int:
    """A 56-bit hash of a coefficient table's contents."""
    data = table.data.detach().cpu().contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.sha256(data).digest()[:7], "little")


def parameter_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


class TensorParallelError(RuntimeError):
    """The group is broken (a rank died, a collective failed or timed out): fatal."""


class Leader:
    """Rank 0: spawns the workers, sends them every step and table write, watches them."""

    rank = 0

    def __init__(self, config, checkpoint: Path) -> None:
        self.size = size = config.tensor_parallel_size
        self.device = rank_device(config.device, 0)
        self.error: str | None = None
        self._on_fatal = None
        self._lock = threading.Lock()  # one command (a step with its collectives) at a time
        self._closing = False
        store = dist.TCPStore("127.0.0.1", 0, size, True,
                              timeout=timedelta(seconds=STARTUP_TIMEOUT),
                              wait_for_workers=False)
        self._store = store
        # plain subprocesses, not multiprocessing's spawn: that re-imports the caller's main
        # module (a script without a __main__ guard would start engines recursively; nora-serve
        # would import the gRPC server in every worker)
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])}
        spec = pickle.dumps((config, checkpoint))
        self.procs: list[subprocess.Popen] = []
        try:
            for r in range(1, size):
                cmd = [sys.executable, "-c", "from nora_runtime.parallel import worker_main; "
                       f"worker_main({r}, {size}, {store.port}, {os.getpid()})"]
                p = subprocess.Popen(cmd, stdin=subprocess.PIPE, env=env)
                p.stdin.write(spec)
                p.stdin.close()
                self.procs.append(p)
            self._wait_joined(store)
            self.group = Group(0, size, store, self.device)
        except BaseException:
            self.close(graceful=False)
            raise
        self.linears = self.group.linears
        self.Table = functools.partial(ReplicatedTable, leader=self)
        for p in self.procs:
            threading.Thread(target=self._watch, args=(p,), name="nora-tp-watch",
                             daemon=True).start()

    def _wait_joined(self, store) -> None:
        """Until every worker has joined the store, failing at once if one dies first."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while store.add("joined", 0) < self.size - 1:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise TensorParallelError(f"tensor-parallel worker (pid {dead[0].pid}) exited "
                                          f"with code {dead[0].returncode} while starting")
            if time.monotonic() > deadline:
                raise TensorParallelError("tensor-parallel workers did not start in time")
            time.sleep(0.05)

    # ---- the runner's side ----------------------------------------------------------------------

    def table_shard(self, table: CoefficientTable) -> TableShard:
        return TableShard(table, 0, self.size)

    def lora_pool_kind(self, hf_config):
        return functools.partial(ShardedLoraPool, group=self.group, leader=self,
                                 slices=projection_slices(hf_config, 0, self.size))

    def min_int(self, n: int) -> int:
        return self.group.min_int(n)

    def forward(self, model, batch, k_cache, v_cache) -> torch.Tensor:
        """Run one step on every rank; rank 0's logits."""
        with self._command(("step", _map_tensors(batch, lambda t: t.cpu()))):
            return model(batch, k_cache, v_cache)

    def parameter_shapes(self, model) -> list[dict[str, tuple[int, ...]]]:
        """Every rank's model parameters' shapes, in rank order (tests, diagnosis)."""
        with self._command(("shapes",)):
            return self.group.gather_object(parameter_shapes(model))

    def tables_agree(self, table: CoefficientTable) -> bool:
        """Whether every rank's coefficient table equals rank 0's `table` (tests, diagnosis)."""
        with self._command(("digest",)):
            return self.group.same(digest(table))

    def write_table(self, slot: int, coefs: torch.Tensor) -> contextlib.AbstractContextManager:
        """Send a table write to the workers; rank 0's own write goes inside the context."""
        return self._command(("table", slot, coefs.detach().cpu()))

    @contextlib.contextmanager
    def _command(self, command):
        if not self._lock.acquire(timeout=TIMEOUT):
            raise TensorParallelError("tensor-parallel group busy past NORA_TP_TIMEOUT")
        try:
            if self.error is not None:
                raise TensorParallelError(self.error)
            try:
                self.group.broadcast_object(command)
                yield
            except Exception as exc:  # ranks may have diverged: the group is done for
                self._fail(f"tensor-parallel {command[0]} failed: {type(exc).__name__}: {exc}")
                raise TensorParallelError(self.error) from exc
        finally:
            self._lock.release()

    # ---- failure --------------------------------------------------------------------------------

    def watch(self, on_fatal) -> None:
        """Call on_fatal(error) once the group breaks (at once if it has)."""
        self._on_fatal = on_fatal
        if self.error is not None:
            on_fatal(self.error)

    def _fail(self, error: str) -> None:
        if self.error is not None or self._closing:
            return
        self.error = error
        log.error("%s", error)
        if self._on_fatal is not None:
            self._on_fatal(error)

    def _watch(self, p: subprocess.Popen) -> None:
        code = p.wait()
        if not self._closing:
            rank = self.procs.index(p) + 1
            self._fail(f"tensor-parallel worker {rank} (pid {p.pid}) died with exit code "
                       f"{code}")

    def close(self, graceful: bool = True) -> None:
        """Stop the workers: with `graceful` (they serve commands) by a stop command, else (a
        start that failed) by SIGKILL; bounded either way."""
        if self._closing:
            return
        self._closing = True  # workers exiting from here on are no failure
        graceful = graceful and hasattr(self, "group") and self.error is None
        if graceful and self._lock.acquire(timeout=TIMEOUT):
            try:
                self.group.broadcast_object(("stop",))
            except Exception:  # noqa: S110 - stopping anyway
                pass
            finally:
                self._lock.release()
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10 if graceful else 0)
            if p.poll() is None:
                p.kill()
                p.wait(timeout=5)


class ReplicatedTable(CoefficientTable):
    """Rank 0's coefficient table: every write (load, replace, unload) also reaches the
    workers' tables, in the same order as the steps."""

    def __init__(self, *args, leader: Leader, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._leader = leader

    def _copy(self, slot: int, src: torch.Tensor) -> None:
        with self._leader.write_table(slot, src):
            super()._copy(slot, src)


def launch(config, checkpoint: Path) -> Leader | None:
    """Rank 0 of a tensor-parallel group of config.tensor_parallel_size processes (the workers
    started and joined); None for one process. A model that does not split over that many
    raises ValueError before any process starts."""
    if config.tensor_parallel_size == 1:
        return None
    from transformers import AutoConfig

    hf, size = AutoConfig.from_pretrained(checkpoint), config.tensor_parallel_size
    for rank in range(size):
        projection_slices(hf, rank, size)
        vocab_slice(hf.vocab_size, rank, size)
    if config.groups % size and size % config.groups:
        raise ValueError(f"rational groups ({config.groups}) and tensor_parallel_size "
                         f"({size}) must divide one another")
    return Leader(config, checkpoint)


# ---- the workers --------------------------------------------------------------------------------


class Follower:
    """Ranks 1..N-1: runs rank 0's commands until "stop"."""

    def __init__(self, rank: int, size: int, port: int, config) -> None:
        self.rank, self.size = rank, size
        self.device = rank_device(config.device, rank)
        store = dist.TCPStore("127.0.0.1", port, size, False,
                              timeout=timedelta(seconds=STARTUP_TIMEOUT))
        store.add("joined", 1)
        self.group = Group(rank, size, store, self.device)
        self.linears = self.group.linears
        self.Table = CoefficientTable

    def table_shard(self, table: CoefficientTable) -> TableShard:
        return TableShard(table, self.rank, self.size)

    def lora_pool_kind(self, hf_config):
        return functools.partial(ShardedLoraPool, group=self.group,
                                 slices=projection_slices(hf_config, self.rank, self.size))

    def min_int(self, n: int) -> int:
        return self.group.min_int(n)

    def close(self) -> None:
        pass

    def serve(self, runner) -> None:
        device = self.device
        while True:
            op, *args = self.group.broadcast_object(timeout=IDLE_TIMEOUT)
            if op == "step":  # the head's gather brings this rank's logit slice to rank 0
                batch = _map_tensors(args[0], lambda t: t.to(device))
                runner.model(batch, runner.k_cache, runner.v_cache)
            elif op == "shapes":
                self.group.gather_object(parameter_shapes(runner.model))
            elif op == "table":
                slot, coefs = args
                runner.table.write(slot, coefs)
            elif op == "lora":
                row, lora = args
                runner.lora.write(row, lora)
            elif op == "digest":
                self.group.same(digest(runner.table))
            elif op == "stop":
                return
            else:
                raise RuntimeError(f"unknown command {op!r}")


def _watch_parent(parent: int) -> None:
    """Exit when rank 0's process is gone (its sockets close too, but a worker busy loading
    would not notice)."""
    def loop() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=loop, name="nora-tp-parent", daemon=True).start()


def worker_main(rank: int, size: int, port: int, parent: int) -> None:
    """A worker process's entry point (Leader starts it; the config comes on stdin)."""
    config, checkpoint = pickle.loads(sys.stdin.buffer.read())
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s %(levelname)s tp{rank} %(name)s: %(message)s")
    _watch_parent(parent)
    if rank_device(config.device, rank).type == "cpu":  # share the cores, don't oversubscribe
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    try:
        from nora_runtime.model_runner import ModelRunner

        follower = Follower(rank, size, port, config)
        runner = ModelRunner(config, checkpoint, tp=follower)
        follower.serve(runner)
    except BaseException:
        log.exception("tensor-parallel worker %d failed", rank)
        os._exit(1)  # rank 0 sees the connections close and stops the engine
    os._exit(0)
