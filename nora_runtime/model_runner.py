"""The model runner: the one object that owns device state (weights, KV cache, coefficient
table, LoRA pool) and turns a scheduled batch into logits (DESIGN.md s2).

The scheduler hands it pure-Python metadata; `prepare` builds the step's device tensors in one
`ForwardBatch`, `forward` runs the model over them.
"""

from __future__ import annotations

import os
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer

from nora_runtime.config import EngineConfig
from nora_runtime.kernels.prefill_attention import prefill_block_q, prefill_tiles
from nora_runtime.llama import ForwardBatch, LlamaModel, load_weights, rope_inv_freq
from nora_runtime.lora_pool import LoraPool, projection_shapes
from nora_runtime.ops import use_triton
from nora_runtime.parallel import DENSE, load_weights_sharded
from nora_runtime.rational import base_coefficients
from nora_runtime.table import CoefficientTable

# transformers' `hidden_act` names -> our activation kinds (Llama-family MLPs use SiLU)
HIDDEN_ACT = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
              "gelu_pytorch_tanh": "gelu_tanh"}


def resolve_device(name: str) -> torch.device:
    """"auto": the current CUDA device if there is one, else the CPU; a CUDA device always
    gets its index (torch.cuda.set_device and streams need one)."""
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                          "cpu" if name == "auto" else name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


CPU_KV_MEMORY_FRACTION = 0.1  # of the memory available at start
CPU_KV_MAX_BYTES = 2 << 30


def available_memory() -> int:
    """Bytes of memory available to new allocations (Linux MemAvailable; else physical)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cpu_kv_tokens(bytes_per_token: int, wanted: int) -> int:
    """CPU KV cache size in tokens: what `wanted` tokens need, but at most 10% of available
    memory and 2 GiB (a CPU serves few sequences at once; SmolLM2-135M in float32 takes 45 KiB a
    token, so 2 GiB hold ~46,000 tokens)."""
    budget = min(int(available_memory() * CPU_KV_MEMORY_FRACTION), CPU_KV_MAX_BYTES)
    return max(1, min(wanted, budget // bytes_per_token))


def init_random(model: LlamaModel, std: float = 0.02) -> None:
    """Random weights in place (transformers' Llama init: normal(0, std) matrices, unit
    norms, zero biases), generated on the model's device."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        elif name.endswith("bias"):
            p.data.zero_()
        else:
            p.data.normal_(0.0, std)


class ModelRunner:
    """Weights, KV cache, coefficient table and LoRA pool of one served model, on one device.

    LoRA pool (`lora`, None when config.max_lora_adapters is 0): allocated before the KV cache,
    which gets the memory left. A step's tokens carry their table slot; `prepare` maps it to
    the coefficient slot and pool row the model reads (LoraPool.route), and a step without
    LoRA tokens runs no LoRA kernel (on GPU: a second set of decode graphs).

    KV cache: [layers, num_blocks * block_size, nkv, d] for keys and for values; block b holds
    rows b * block_size .. (b + 1) * block_size - 1. Its size comes from free device memory times
    config.kv_memory_fraction on GPU, from config.kv_cache_tokens_cpu (or cpu_kv_tokens) on CPU.
    """

    def __init__(self, config: EngineConfig, checkpoint: Path, tp=None) -> None:
        self.config = config
        # tensor parallelism: this rank's side of the group (parallel.Leader on rank 0, which
        # the engine launches; parallel.Follower on the workers); None in one process
        if tp is None and config.tensor_parallel_size > 1:
            raise ValueError("tensor_parallel_size > 1 needs parallel.launch()'s group")
        self.tp = tp
        self.device = tp.device if tp is not None else resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.hf_config = AutoConfig.from_pretrained(checkpoint)
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        act = HIDDEN_ACT.get(self.hf_config.hidden_act)
        if act is None:
            raise ValueError(f"hidden_act {self.hf_config.hidden_act!r} has no rational fit")
        self.act = act
        L = self.hf_config.num_hidden_layers
        table_kind = CoefficientTable if tp is None else tp.Table  # rank 0's sends its writes
        self.table = table_kind(base_coefficients(act), slots=config.max_adapters + 1,
                                groups=config.groups, sites=L, device=self.device)
        rows = min(config.max_lora_adapters, config.max_adapters)  # each needs a table slot
        pool_kind = LoraPool if tp is None else tp.lora_pool_kind(self.hf_config)
        self.lora = None if not rows else pool_kind(
            slots=rows, rank=config.max_lora_rank, layers=L,
            shapes=projection_shapes(self.hf_config), targets=config.lora_target_modules,
            table_slots=self.table.num_slots, dtype=self.dtype, device=self.device)
        self.model = self._load_model(checkpoint)
        attn = self.model.layers[0].self_attn
        self.block_size = config.block_size
        self.block_q = prefill_block_q(attn.nh, attn.nkv)  # tokens a prefill-kernel tile
        self.num_blocks = self._kv_blocks(attn.nkv, attn.d)
        if tp is not None:  # rank 0's block tables index every rank's cache
            self.num_blocks = tp.min_int(self.num_blocks)
        # one extra block past the scheduler's: padding rows of graph replays write there
        shape = (L, (self.num_blocks + 1) * self.block_size, attn.nkv, attn.d)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.lora_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # graphs capture the paged decode kernel; the torch path (NORA_BACKEND=torch) attends
        # per sequence from host-side metadata, which a replay cannot change
        if (config.cuda_graphs and self.device.type == "cuda" and use_triton(self.k_cache)
                and tp is None):  # not with tensor parallelism yet
            self._capture_decode_graphs()

    def _load_model(self, checkpoint: Path) -> LlamaModel:
        tp = self.tp
        with torch.device("meta"):  # no host copy of random weights: 8B would be 32 GB
            model = LlamaModel(self.hf_config, self.table if tp is None else
                               tp.table_shard(self.table), self.act, self.config.mode,
                               self.lora, linears=DENSE if tp is None else tp.linears)
        model = model.to_empty(device=self.device).to(self.dtype)
        if self.hf_config.tie_word_embeddings:  # leaving the meta device unties them
            model.lm_head.weight = model.embed_tokens.weight
        if self.config.load_format == "dummy":
            if tp is not None:  # replicated weights must agree across ranks
                torch.manual_seed(self.config.seed)
            init_random(model)
        else:
            (load_weights if tp is None else load_weights_sharded)(model, checkpoint)
        head_dim = model.layers[0].self_attn.d
        model.inv_freq = rope_inv_freq(self.hf_config, head_dim).to(self.device)
        return model.eval().requires_grad_(False)

    def _kv_blocks(self, nkv: int, d: int) -> int:
        per_block = 2 * self.hf_config.num_hidden_layers * self.block_size * nkv * d
        per_block *= torch.finfo(self.dtype).bits // 8
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            # leave room for activations of a full step (N x 2I in fp32, a few times over)
            step = 8 * self.config.max_num_batched_tokens * self.hf_config.intermediate_size * 4
            n = int((free - step) * self.config.kv_memory_fraction) // per_block
        else:
            tokens = self.config.kv_cache_tokens_cpu or cpu_kv_tokens(
                per_block // self.block_size, self.config.max_num_seqs * self.config.max_model_len)
            n = tokens // self.block_size
        if n < 1:
            raise RuntimeError("no memory left for the KV cache")
        return n

    def prepare(self, seqs, num_new: list[int], sample: list[bool]) -> ForwardBatch:
        """Device tensors of one step. seqs: objects with .token_slice(start, stop) (known token
        ids), .num_computed, .block_table, .slot; num_new[i] tokens of seqs[i] are computed now.

        Built from per-sequence numpy arrays (no per-token Python: the H200 profile measured
        4.1 ms a step for the per-token lists this replaces), then copied in two transfers:
        the int64 fields in one, the int32 fields in another."""
        B, bs = len(seqs), self.block_size
        n = np.asarray(num_new, dtype=np.int64)  # [B] new tokens
        first = np.fromiter((s.num_computed for s in seqs), np.int64, B)  # [B]
        q_start = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(n, out=q_start[1:])
        N = int(q_start[-1])
        decode = bool((n == 1).all())
        ids = np.fromiter(chain.from_iterable(
            s.token_slice(c, c + k) for s, c, k in zip(seqs, first.tolist(), num_new,
                                                       strict=True)), np.int64, N)
        seq_of = np.repeat(np.arange(B), n)  # [N] sequence of each token
        pos = np.arange(N) - q_start[seq_of] + first[seq_of]  # [N]
        lens = np.fromiter((len(s.block_table) for s in seqs), np.int64, B)
        tables = np.zeros((B, int(lens.max())), dtype=np.int64)  # [B, W] (0-padded)
        tables[np.arange(tables.shape[1]) < lens[:, None]] = np.fromiter(
            chain.from_iterable(s.block_table for s in seqs), np.int64, int(lens.sum()))
        kv = tables[seq_of, pos // bs] * bs + pos % bs  # [N] cache rows
        samp = q_start[1:][np.asarray(sample, dtype=bool)] - 1  # [B'] last token of each
        slots, lora_rows = [s.slot for s in seqs], None
        if self.lora is not None:  # table slot -> coefficient slot and LoRA pool row
            slots, lora_rows = self.lora.route(slots)

        # one transfer for the int64 fields, one for the int32 ones; views split them
        wide = torch.from_numpy(np.concatenate([ids, pos, kv, samp])).to(self.device)
        ids_t, pos_t, kv_t, samp_t = wide.split([N, N, N, len(samp)])
        narrow = [np.repeat(np.asarray(slots, dtype=np.int64), n), tables.ravel(), first + n]
        if lora_rows is not None:
            narrow.append(np.repeat(np.asarray(lora_rows, dtype=np.int64), n))
        tiles = None if decode else prefill_tiles(n, self.block_q, first + n)
        if not decode:
            narrow += [q_start, tiles.ravel()]
        parts = torch.from_numpy(np.concatenate(narrow).astype(np.int32)).to(
            self.device).split([len(a) for a in narrow])
        batch = ForwardBatch(ids_t, pos_t, parts[0], kv_t, samp_t, bs,
                             parts[1].view(B, -1), parts[2], block_q=self.block_q)
        if lora_rows is not None:
            batch.lora_rows = parts[3]
        if not decode:
            batch.q_start, batch.tiles = parts[-2], parts[-1].view(-1, 2)
        return batch

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [B', V] float32 of the rows batch.sample_index (a decode step of a captured
        batch size replays its CUDA graph)."""
        if self.tp is not None:  # tensor parallel: the batch goes to every rank (parallel.py)
            return self.tp.forward(self.model, batch, self.k_cache, self.v_cache)
        B = batch.input_ids.shape[0]
        graphs = self.graphs if batch.lora_rows is None else self.lora_graphs
        size = next((b for b in sorted(graphs) if b >= B), None)
        if not batch.is_decode or size is None or batch.sample_index.shape[0] != B:
            return self.model(batch, self.k_cache, self.v_cache)
        st = self._static
        pad = (self.num_blocks * self.block_size, self.num_blocks)  # scratch row and block
        inputs = [("ids", batch.input_ids, 0), ("pos", batch.positions, 0),
                  ("slots", batch.slots, 0), ("kv", batch.kv_index, pad[0]),
                  ("ctx", batch.ctx_lens, 1)]
        if batch.lora_rows is not None:
            inputs.append(("lora", batch.lora_rows, 0))
        for name, value, fill in inputs:
            st[name][:B].copy_(value)
            st[name][B:size].fill_(fill)
        st["tables"][:size].fill_(pad[1])
        st["tables"][:B, :batch.block_tables.shape[1]].copy_(batch.block_tables)
        graph, logits = graphs[size]
        graph.replay()
        return logits[:B].clone()

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any."""
        if self.tp is not None:
            self.tp.close()

    def _capture_decode_graphs(self) -> None:
        """Capture decode steps at bucketed batch sizes, without LoRA and (with a LoRA pool)
        with it. The graphs read the coefficient table, LoRA pool and KV cache in place, so
        later adapter loads and swaps need no recapture."""
        top = min(self.config.max_num_seqs, 256)
        sizes = sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < top} | {top})
        width = -(-self.config.max_model_len // self.block_size)
        dev, long, i32 = self.device, torch.long, torch.int32
        st = self._static = {
            "ids": torch.zeros(top, dtype=long, device=dev),
            "pos": torch.zeros(top, dtype=long, device=dev),
            "slots": torch.zeros(top, dtype=i32, device=dev),
            "lora": torch.zeros(top, dtype=i32, device=dev),
            "kv": torch.full((top,), self.num_blocks * self.block_size, dtype=long, device=dev),
            "ctx": torch.ones(top, dtype=i32, device=dev),
            "tables": torch.full((top, width), self.num_blocks, dtype=i32, device=dev),
            "sample": torch.arange(top, device=dev),  # every row samples in decode
        }
        pool = torch.cuda.graph_pool_handle()
        sets = [(self.graphs, False)] + ([(self.lora_graphs, True)] if self.lora else [])
        for graphs, with_lora in sets:
            for b in reversed(sizes):  # largest first, so smaller graphs reuse its memory
                batch = ForwardBatch(st["ids"][:b], st["pos"][:b], st["slots"][:b],
                                     st["kv"][:b], st["sample"][:b], self.block_size,
                                     st["tables"][:b], st["ctx"][:b],
                                     lora_rows=st["lora"][:b] if with_lora else None)
                self.model(batch, self.k_cache, self.v_cache)  # warm-up: compile kernels
                torch.cuda.synchronize(dev)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self.model(batch, self.k_cache, self.v_cache)
                graphs[b] = (graph, logits)
