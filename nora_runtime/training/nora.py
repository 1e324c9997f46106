"""Make a transformers model trainable with a NoRA adapter (and, for NoRA++, LoRA).

`NoraModel.build(model, ...)` converts the model's MLP activations (nora_runtime.convert, the
same rational and slot machinery the server uses), freezes every weight, and adds the trainable
parts: a NoraAdapter over all activation sites, optional LoRA on chosen linear layers and
optional trainable head modules (a classifier on a new label set).

While training, the binding's coefficient table is replaced by a two-slot `AdapterTable`
whose slot 1 is the adapter's merged coefficients, recomputed (differentiably) before every
forward; every token runs slot 1. `to_table()` goes back to an ordinary CoefficientTable with the
trained adapter written in slot 1, for mixed batches (`binding.use(slots)`, slot 0 the base).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nora_runtime.adapter import NoraAdapter, base_fingerprint, save_adapter
from nora_runtime.convert import SlotBinding, convert_model
from nora_runtime.rational import base_coefficients
from nora_runtime.table import CoefficientTable, expand_groups
from nora_runtime.training.lora import LoraLinear, add_lora, lora_weights

ADAPTED_SLOT = 1


class AdapterTable:
    """Stands in for a binding's CoefficientTable while training: [2, L, G', 10], slot 0 the
    base, slot 1 the adapter's merged coefficients (a function of its factors)."""

    num_slots = 2

    def __init__(self, base: torch.Tensor, adapter: NoraAdapter) -> None:
        self.base = base  # [L, G', 10]
        self.adapter = adapter
        self.refresh()

    @property
    def groups(self) -> int:
        return self.base.shape[1]

    @property
    def num_sites(self) -> int:
        return self.base.shape[0]

    def refresh(self) -> None:
        """Merge the adapter's current factors (once per forward, not once per site)."""
        coefs = expand_groups(self.adapter.merged(), self.groups)  # [L, G', 10]
        self.data = torch.stack([self.base, coefs])

    def site(self, l: int) -> torch.Tensor:  # [2, G', 10]
        return self.data[:, l]


@dataclass(frozen=True)
class NoraSettings:
    """The NoRA part. groups: G of the base coefficients (the server's table has 8);
    group_extend: the adapter has G' = groups * group_extend groups (the server needs G' to
    divide its table's G); layers: indices of the activation sites that are trained (None: all;
    the others keep the base exactly); mode: "replace" or "residual" (as the server runs)."""

    groups: int = 8
    group_extend: int = 1
    rank: int = 3
    alpha: float = 6.0
    layers: tuple[int, ...] | None = None
    mode: str = "residual"  # the server's default: the base model stays exact

    def __post_init__(self) -> None:
        for name in ("groups", "group_extend", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"NoRA {name} must be >= 1, got {getattr(self, name)}")
        if not self.alpha > 0:
            raise ValueError(f"NoRA alpha must be > 0, got {self.alpha}")


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA part of NoRA++: glob patterns of the nn.Linear modules it adapts."""

    targets: tuple[str, ...]
    rank: int = 8
    alpha: float = 16.0


class NoraModel(nn.Module):
    """A converted, frozen transformers model with its trainable adapter parts."""

    def __init__(self, model: nn.Module, binding: SlotBinding, adapter: NoraAdapter,
                 fingerprint: str, site_mask: torch.Tensor, lora: dict[str, LoraLinear],
                 lora_settings: LoraSettings | None, head: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.adapter = adapter
        self.binding = binding
        self.fingerprint = fingerprint
        self.register_buffer("site_mask", site_mask)  # [L] 1.0 for trained sites
        self.lora = nn.ModuleDict({k.replace(".", "/"): m for k, m in lora.items()})
        self.lora_paths = list(lora)
        self.lora_settings = lora_settings
        self.head = tuple(head)
        self._train_table = AdapterTable(binding.table.data[0].clone(), adapter)
        self._serve_table = binding.table
        binding.table = self._train_table
        for p in adapter.parameters():  # sites outside `layers` stay exactly the base
            p.register_hook(lambda g: g * self.site_mask.view(-1, 1, 1))

    @classmethod
    def build(cls, model: nn.Module, nora: NoraSettings = NoraSettings(),
              lora: LoraSettings | None = None, head: Sequence[str] = (),
              seed: int | None = None) -> NoraModel:
        """Convert `model` in place and add the adapter parts. head: names of submodules
        (e.g. "classifier") trained in full. The base fingerprint is taken before conversion.
        seed: makes the adapter's random init (A factors) reproducible."""
        kinds = {type(m).__name__ for m in model.modules()}
        if "RationalActivation" in kinds:
            raise ValueError("model is already converted; pass the original transformers model")
        model.requires_grad_(False)
        G = nora.groups * nora.group_extend
        binding = convert_model(model, mode=nora.mode, groups=G, slots=2)
        act = binding.kinds[0]
        if set(binding.kinds) != {act}:
            raise ValueError(f"activation sites of different kinds {set(binding.kinds)}: an "
                             "adapter file has one")
        fingerprint = base_fingerprint(model, act)
        L = len(binding.site_names)
        base = base_coefficients(act, binding.fit).expand(L, nora.groups, -1)  # [L, G, 10]
        # the A factors of NoRA and LoRA are drawn on the CPU, so `seed` fixes them on any device
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.default_generator.manual_seed(seed)
            adapter = NoraAdapter(base, rank=nora.rank, alpha=nora.alpha, groups=G,
                                  site_names=list(binding.site_names), act=act, mode=nora.mode)
        layers = range(L) if nora.layers is None else nora.layers
        bad = [l for l in layers if not 0 <= l < L]
        if bad:
            raise ValueError(f"NoRA layers {bad} out of range: the model has {L} sites")
        mask = torch.zeros(L)
        mask[list(layers)] = 1.0
        wrapped = {}
        if lora is not None:
            with torch.random.fork_rng(devices=[]):
                if seed is not None:
                    torch.default_generator.manual_seed(seed + 1)
                wrapped = add_lora(model, list(lora.targets), lora.rank, lora.alpha)
        for name in head:
            model.get_submodule(name).requires_grad_(True)
        device = next(model.parameters()).device
        return cls(model, binding, adapter.to(device), fingerprint, mask.to(device), wrapped,
                   lora, head)

    # ---- training ---------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        """Parameters that training changes: the factors of trained sites, LoRA, head."""
        per_site = sum(p[0].numel() for p in self.adapter.parameters())
        n = int(self.site_mask.sum().item()) * per_site
        n += sum(m.A.numel() + m.B.numel() for m in self.lora.values())
        return n + sum(p.numel() for name in self.head
                       for p in self.model.get_submodule(name).parameters())

    def forward(self, **batch: torch.Tensor):
        """The model's output with every token on the adapter (slot 1)."""
        self._train_table.refresh()
        slots = torch.full((batch_size(batch),), ADAPTED_SLOT, dtype=torch.int32)
        with self.binding.use(slots):
            return self.model(**batch)

    # ---- results ----------------------------------------------------------------------------

    def head_state(self) -> dict[str, torch.Tensor]:
        """Trained head weights by their name in the transformers model."""
        return {f"{h}.{k}": v.detach() for h in self.head
                for k, v in self.model.get_submodule(h).state_dict().items()}

    def save(self, path: str | Path) -> None:
        """Write the adapter file (NoRA, or NoRA++ with the LoRA part); trained head modules go
        to a second safetensors file beside it, `<stem>.head.safetensors`."""
        lw = None
        if self.lora_settings is not None:
            modules = {p: self.lora[p.replace(".", "/")] for p in self.lora_paths}
            lw = lora_weights(modules, self.lora_settings.rank, self.lora_settings.alpha)
        save_adapter(self.adapter, path, base_fingerprint=self.fingerprint, lora=lw)
        if self.head:
            from safetensors.torch import save_file

            head = {k: v.float().cpu().contiguous() for k, v in self.head_state().items()}
            save_file(head, head_path(path), metadata={"base_fingerprint": self.fingerprint})

    @contextmanager
    def serving(self, slots: torch.Tensor):
        """Run the model as the server would: the converted model's own CoefficientTable with
        the trained adapter in slot 1, each row on its slot in `slots` ([B], 0 = the base)."""
        table: CoefficientTable = self._serve_table
        with torch.no_grad():
            table.write(ADAPTED_SLOT, self.adapter.merged())
        self.binding.table = table
        try:
            with torch.no_grad(), self.binding.use(slots):
                yield
        finally:
            self.binding.table = self._train_table


def head_path(adapter_path: str | Path) -> Path:
    p = Path(adapter_path)
    return p.with_name(p.name.removesuffix(".safetensors") + ".head.safetensors")


def batch_size(batch: dict[str, torch.Tensor]) -> int:
    for key in ("input_ids", "pixel_values", "inputs_embeds"):
        if key in batch:
            return batch[key].shape[0]
    raise ValueError(f"cannot tell the batch size from keys {sorted(batch)}")
