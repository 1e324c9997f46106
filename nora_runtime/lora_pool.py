"""The LoRA pool: one static device buffer per adapted projection, sized at start (like the KV
cache), holding every resident LoRA adapter's factors (DESIGN.md s2, issue 13).

Per decoder layer l and projection m (nora_runtime.lora.PROJECTIONS, those in `targets`):

    A[l, m]: [P, R, in]   B[l, m]: [P, out, R]   (the model's dtype)   scale[l, m]: [P] float32

P = max_lora_adapters + 1 rows; row 0 is never written (zeros, scale 0): "no LoRA". An adapter
of rank r <= R fills A[:r] and B[:, :r] of its row and zeros the rest, and projections it does
not adapt get zeros and scale 0, so one gathered kernel serves any mix of ranks and targets
(nora_runtime.kernels.lora). Nothing is reallocated after start: captured CUDA graphs stay valid
across loads. On a GPU, writes go through a side stream from pinned memory, as the coefficient
table's do; the row written is one no running request reads (the registry's invariant).

The pool also maps coefficient-table slots (the per-request slot that the registry hands out
and every token carries) to what the model reads for them: `row[slot]` (the pool row, 0 for
none) and `lora_only[slot]` (a LoRA adapter without NoRA coefficients: its tokens use the
base coefficients, table slot 0, so its activations are the base's exactly). The registry sets
a slot's mapping (`bind`) when it installs an adapter there, so both change only for slots that
no running request holds; the model runner reads them when it builds a step (`route`).
"""

from __future__ import annotations

import torch

from nora_runtime.adapter import AdapterMismatchError, UnsupportedAdapter
from nora_runtime.lora import PROJECTIONS, LoraAdapter
from nora_runtime.ops import lora_delta


class LoraShapeMismatch(AdapterMismatchError):
    """The LoRA's factors do not fit the served model's projections or layer count
    (FAILED_PRECONDITION)."""


def projection_shapes(hf_config) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each projection of a Llama-family decoder layer."""
    H, I = hf_config.hidden_size, hf_config.intermediate_size
    nh, nkv = hf_config.num_attention_heads, hf_config.num_key_value_heads
    d = getattr(hf_config, "head_dim", None) or H // nh
    return {"q_proj": (H, nh * d), "k_proj": (H, nkv * d), "v_proj": (H, nkv * d),
            "o_proj": (nh * d, H), "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}


class LoraPool:
    """Static LoRA factors for `slots` adapters of rank <= `rank` (module docstring).

    shapes: projection -> (in, out) (projection_shapes); targets: the projections served (an
    adapter of others is refused); table_slots: the coefficient table's slot count.
    """

    def __init__(self, *, slots: int, rank: int, layers: int,
                 shapes: dict[str, tuple[int, int]], targets: tuple[str, ...] = PROJECTIONS,
                 table_slots: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        if slots < 1 or rank < 1 or layers < 1 or table_slots < 1:
            raise ValueError(f"need slots, rank, layers, table_slots >= 1, got {slots=} "
                             f"{rank=} {layers=} {table_slots=}")
        bad = [t for t in targets if t not in PROJECTIONS]
        if bad or not targets:
            raise ValueError(f"targets must be among {PROJECTIONS}, got {targets}")
        self.capacity, self.rank, self.num_layers = slots, rank, layers
        self.targets = tuple(p for p in PROJECTIONS if p in targets)
        self.shapes = {m: shapes[m] for m in self.targets}
        P = slots + 1
        self.A: dict[tuple[int, str], torch.Tensor] = {}
        self.B: dict[tuple[int, str], torch.Tensor] = {}
        self.scale: dict[tuple[int, str], torch.Tensor] = {}
        for l in range(layers):
            for m, (n_in, n_out) in self.shapes.items():
                self.A[l, m] = torch.zeros(P, rank, n_in, dtype=dtype, device=device)
                self.B[l, m] = torch.zeros(P, n_out, rank, dtype=dtype, device=device)
                self.scale[l, m] = torch.zeros(P, dtype=torch.float32, device=device)
        self.row = [0] * table_slots  # table slot -> pool row (0: no LoRA)
        self.lora_only = [False] * table_slots  # table slot -> reads the base coefficients
        self._stream = None
        first = self.A[0, self.targets[0]]
        if first.is_cuda:
            torch.cuda.synchronize(first.device)  # the side stream waits for nothing
            self._stream = torch.cuda.Stream(first.device)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for d in (self.A, self.B, self.scale) for t in d.values())

    # ---- the registry's side ------------------------------------------------------------------

    def check(self, lora: LoraAdapter) -> None:
        """Raise unless `lora` fits this pool and the served model: projections among the
        targets, rank <= the pool's, layers and in/out features of the model."""
        if lora.rank > self.rank:
            raise UnsupportedAdapter(f"LoRA rank {lora.rank} exceeds this server's "
                                     f"max_lora_rank={self.rank}")
        extra = [m for m in lora.targets if m not in self.targets]
        if extra:
            raise UnsupportedAdapter(f"LoRA on {extra} is not served: this server's LoRA "
                                     f"targets are {list(self.targets)}")
        for (l, m), mod in lora.modules.items():
            if l >= self.num_layers:
                raise LoraShapeMismatch(f"LoRA adapts layer {l}; the model has "
                                        f"{self.num_layers} layers")
            n_in, n_out = self.shapes[m]
            if mod.A.shape[1] != n_in or mod.B.shape[0] != n_out:
                raise LoraShapeMismatch(
                    f"LoRA factors of layer {l} {m} are A {tuple(mod.A.shape)}, B "
                    f"{tuple(mod.B.shape)}; the model's {m} is in={n_in}, out={n_out} (an "
                    "adapter of another base model?)")

    def write(self, row: int, lora: LoraAdapter) -> None:
        """Put `lora`'s factors (checked already) into pool row `row`, zero-padded; every
        projection it does not adapt gets zeros. Complete when this returns."""
        if not 0 < row <= self.capacity:
            raise ValueError(f"pool row {row} out of range 1..{self.capacity}")
        self.check(lora)
        if self._stream is None:
            self._write(row, lora)
            return
        with torch.cuda.stream(self._stream):
            self._write(row, lora)
        self._stream.synchronize()

    def _write(self, row: int, lora: LoraAdapter) -> None:
        pinned = self._stream is not None
        for key, A in self.A.items():
            B, scale = self.B[key], self.scale[key]
            mod = lora.modules.get(key)
            if mod is None:
                A[row].zero_()
                B[row].zero_()
                scale[row] = 0.0
                continue
            r = mod.rank
            a = torch.zeros(A.shape[1:], dtype=A.dtype)  # [R, in], padded on the host: one copy
            a[:r] = mod.A
            b = torch.zeros(B.shape[1:], dtype=B.dtype)  # [out, R]
            b[:, :r] = mod.B
            if pinned:
                a, b = a.pin_memory(), b.pin_memory()
            A[row].copy_(a, non_blocking=pinned)
            B[row].copy_(b, non_blocking=pinned)
            scale[row] = mod.scale

    def bind(self, slot: int, row: int, lora_only: bool) -> None:
        """Table slot `slot` now serves pool row `row` (0: no LoRA); `lora_only`: its tokens
        use the base coefficients."""
        self.row[slot], self.lora_only[slot] = row, lora_only

    # ---- the model's side ---------------------------------------------------------------------

    def route(self, slots: list[int]) -> tuple[list[int], list[int] | None]:
        """Per token: (coefficient-table slots, pool rows or None when no token has a LoRA)."""
        rows = [self.row[s] for s in slots]
        coef = [0 if self.lora_only[s] else s for s in slots]
        return coef, rows if any(rows) else None

    def serves(self, module: str) -> bool:
        return module in self.shapes

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, module: str,
              rows: torch.Tensor) -> None:
        """y[t] += scale * B @ (A @ x[t]) with token t's pool row rows[t], in place (the one
        call through which LoRA adapters reach the model's projections)."""
        key = (layer, module)
        lora_delta(y, x, self.A[key], self.B[key], self.scale[key], rows)
