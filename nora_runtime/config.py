"""Engine configuration: one frozen dataclass, validated on construction. The CLI (`nora-serve`)
reads its defaults from here."""

from __future__ import annotations

from dataclasses import dataclass

from nora_runtime.lora import PROJECTIONS
from nora_runtime.rational import MODES


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # checkpoint directory, hub id or .gguf file; None = the default
    #                            model, SmolLM2-135M-Instruct (nora_runtime.checkpoint)
    device: str = "auto"  # "auto" (cuda if available), "cuda", "cuda:1", "cpu"
    dtype: str = "auto"  # "auto" (bfloat16 on GPU, float32 on CPU), "bfloat16", "float32"
    # activation mode (DESIGN.md s1): "residual" keeps a checkpoint trained with its own
    # activation exact (adapters add a bounded change); "replace" is for models trained with
    # rational activations
    mode: str = "residual"
    groups: int = 8  # rational groups G of the coefficient table
    max_adapters: int = 1024  # adapter slots resident at once (table rows besides the base)
    # of those, at most this many hold inline adapters (bytes sent with requests, LRU among
    # themselves; they never evict named adapters). None: max_adapters // 4 (at least 1);
    # 0: inline adapters are refused
    max_inline_adapters: int | None = None
    # LoRA pool (nora_runtime.lora_pool), allocated at start: LoRA and NoRA++ adapters resident
    # at once (0: LoRA and NoRA++ adapters are refused), the largest rank served (smaller ranks
    # are zero-padded: the pool's size and each step's LoRA work scale with it), and the
    # projections served. 8B model, bf16, rank 16 on all seven: ~84 MB per adapter. Each
    # also takes one of the max_adapters slots, so the pool has min(both) rows
    max_lora_adapters: int = 8
    max_lora_rank: int = 16
    lora_target_modules: tuple[str, ...] = PROJECTIONS
    # of those, at most this many hold inline adapters. None: max_lora_adapters // 4 (at
    # least 1); 0: inline LoRA / NoRA++ adapters are refused
    max_inline_lora_adapters: int | None = None
    max_num_seqs: int = 256  # cap on running sequences
    max_num_batched_tokens: int = 4096  # token budget of one step (prefill chunks + decodes)
    max_model_len: int = 4096  # prompt + generated tokens of one sequence
    block_size: int = 16  # tokens per KV cache block
    kv_memory_fraction: float = 0.85  # GPU: fraction of free memory given to the KV cache
    # CPU: KV cache size in tokens; None: sized from the model and available memory
    # (model_runner.cpu_kv_tokens)
    kv_cache_tokens_cpu: int | None = None
    tenant_share: float = 0.5  # while others wait, one tenant holds at most this share of seats
    # admission passes over a waiting prompt whose KV blocks do not fit for at most this long
    # (smaller ones behind it go first), then waits for it (scheduler.py)
    admission_skip_seconds: float = 2.0
    kv_watermark: float = 0.01  # fraction of KV blocks that admission leaves free for decodes
    max_consecutive_step_failures: int = 3  # then the engine stops (health NOT_SERVING)
    cuda_graphs: bool = True  # capture decode steps on GPU at bucketed batch sizes
    seed: int = 0  # for requests without a seed of their own
    load_format: str = "auto"  # "auto": the checkpoint's safetensors; "dummy": random weights
    # (as vLLM's), for benchmarks of a model shape from its config.json alone
    # processes (one per device) that split the model Megatron-style (nora_runtime.parallel)
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.model == "":
            raise ValueError("model must not be empty (None: the default model)")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be auto or dummy, got {self.load_format!r}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be auto, bfloat16, float16 or float32: {self.dtype!r}")
        for name in ("groups", "max_adapters", "max_num_seqs", "max_num_batched_tokens",
                     "max_model_len", "block_size", "kv_cache_tokens_cpu"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_lora_adapters < 0:
            raise ValueError(f"max_lora_adapters must be >= 0, got {self.max_lora_adapters}")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        targets = self.lora_target_modules
        if (isinstance(targets, str) or not targets
                or any(t not in PROJECTIONS for t in targets)):
            raise ValueError(f"lora_target_modules must be a non-empty tuple of {PROJECTIONS}, "
                             f"got {targets!r}")
        if self.max_inline_lora_adapters is not None and not (
                0 <= self.max_inline_lora_adapters <= self.max_lora_adapters):
            raise ValueError(f"max_inline_lora_adapters must be in [0, max_lora_adapters="
                             f"{self.max_lora_adapters}], got {self.max_inline_lora_adapters}")
        if self.max_inline_adapters is not None and not (
                0 <= self.max_inline_adapters <= self.max_adapters):
            raise ValueError(f"max_inline_adapters must be in [0, max_adapters="
                             f"{self.max_adapters}], got {self.max_inline_adapters}")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                             f"max_num_seqs ({self.max_num_seqs}): every running sequence needs "
                             "a token of the step's budget to decode")
        if not (0.0 <= self.admission_skip_seconds < float("inf")):
            raise ValueError("admission_skip_seconds must be finite and >= 0, got "
                             f"{self.admission_skip_seconds}")
        if not 0.0 <= self.kv_watermark < 1.0:
            raise ValueError(f"kv_watermark must be in [0, 1), got {self.kv_watermark}")
        if self.max_consecutive_step_failures < 1:
            raise ValueError("max_consecutive_step_failures must be >= 1, got "
                             f"{self.max_consecutive_step_failures}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if not 0.0 < self.tenant_share <= 1.0:
            raise ValueError(f"tenant_share must be in (0, 1], got {self.tenant_share}")
