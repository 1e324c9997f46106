"""Model conversion: put multi-tenant rational activations into a transformers model.

`convert_model(model)` replaces every MLP activation of a transformers model (Llama / Mistral /
Qwen2 `act_fn`, GPT-2 `act`, BERT `intermediate_act_fn`, ViT `intermediate_act_fn` (<= 4.x) or
`activation_fn` (5.x)) by a `RationalActivation` that evaluates, for every token, the rational
of that token's slot in one shared `CoefficientTable`. The slots of the current batch enter
through one explicit call site, `with binding.use(slots): model(...)`, so model files stay
unaware of adapters (DESIGN.md s4) and nothing lives in module-level globals.

`fidelity(original, converted, inputs)` measures how far a conversion moves the outputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from nora_runtime.ops import rational_act
from nora_runtime.rational import (
    ACTIVATIONS,
    DEFAULT_FIT,
    MODES,
    base_activation,
    base_coefficients,
)
from nora_runtime.table import CoefficientTable

# Attribute names under which transformers MLPs keep their activation (checked in transformers
# 4.51 and 5.x): act_fn (Llama, Mistral, Qwen2, Gemma), act (GPT-2, Falcon),
# intermediate_act_fn (BERT, ViT <= 4.x), activation_fn (ViT 5.x, CLIP, Phi, OPT). Heads and
# poolers (`transform_act_fn`, `activation`) are not MLP sites and keep their activation.
SITE_ATTRS = ("act_fn", "act", "intermediate_act_fn", "activation_fn")

# Probe for classifying an activation: the kinds differ by >= 4.7e-4 on it (gelu vs its tanh
# approximation), float64 implementations of one kind agree to < 1e-12 and float32 ones to ~1e-6.
_PROBE = torch.linspace(-6.0, 6.0, 1201, dtype=torch.float64)
_MATCH_TOL = 1e-5


class SlotBinding:
    """One converted model's adapter state: its coefficient table and the current batch's slots.

    site_names: module path of each activation site, in table order (site l is data[:, l]).
    kinds: base activation kind of each site. mode: "replace" or "residual". clamp: the fit
    range used by residual mode. fit: which shipped fit (rational.FIT_SPECS) the base slot holds.
    """

    def __init__(
        self, table: CoefficientTable, site_names: tuple[str, ...], kinds: tuple[str, ...],
        mode: str, clamp: float, fit: str = DEFAULT_FIT,
    ) -> None:
        self.table = table
        self.site_names = site_names
        self.kinds = kinds
        self.mode = mode
        self.clamp = clamp
        self.fit = fit
        self._slots: torch.Tensor | None = None  # int32, [B], [B, S] or [T]

    @contextmanager
    def use(self, slots: torch.Tensor) -> Iterator[None]:
        """Run the model with these slots: int [B] (one per sequence, broadcast over positions),
        [B, S] (per token) or [T] (per token, flattened). Nests; restores the previous slots."""
        slots = self._validate(slots)
        previous, self._slots = self._slots, slots
        try:
            yield
        finally:
            self._slots = previous

    def slots_for(self, lead: torch.Size, device: torch.device) -> torch.Tensor:
        """Each token's slot for an activation input of leading shape `lead`. int32 [*lead].
        With no slots bound every token uses slot 0 (the base)."""
        s = self._slots
        if s is None:
            return torch.zeros(lead, dtype=torch.int32, device=device)
        if s.shape == lead:
            return s
        if s.dim() == 1 and len(lead) > 1 and s.shape[0] == lead[0]:  # one slot per sequence
            # contiguous: the kernels index slots as a dense [T] (a stride-0 view is not)
            return s.view(-1, *([1] * (len(lead) - 1))).expand(lead).contiguous()
        if s.numel() == lead.numel():  # per token, flattened
            return s.view(lead)
        raise ValueError(f"bound slots of shape {tuple(s.shape)} do not fit activations of "
                         f"leading shape {tuple(lead)}")

    def _validate(self, slots: torch.Tensor) -> torch.Tensor:
        if slots.dtype.is_floating_point or slots.dtype.is_complex or slots.dtype == torch.bool:
            raise TypeError(f"slots must be an integer tensor, got {slots.dtype}")
        if slots.dim() not in (1, 2):
            raise ValueError(f"slots must be [B], [B, S] or [T], got {tuple(slots.shape)}")
        slots = slots.to(device=self.table.data.device, dtype=torch.int32).contiguous()
        # An out-of-range slot would make the kernels read outside the table. The check syncs,
        # so it is skipped while a CUDA graph is being captured (its inputs were checked before).
        capturing = slots.is_cuda and torch.cuda.is_current_stream_capturing()
        if not capturing and slots.numel() and (
            int(slots.min()) < 0 or int(slots.max()) >= self.table.num_slots
        ):
            raise ValueError(f"slots must lie in 0..{self.table.num_slots - 1}")
        return slots


class RationalActivation(nn.Module):
    """Activation site `site` of a converted model: the multi-tenant rational of ops.rational_act
    with the coefficients binding.table.site(site) and each token's slot from the binding."""

    def __init__(self, site: int, kind: str, binding: SlotBinding) -> None:
        super().__init__()
        self.site = site
        self.kind = kind
        self.binding = binding  # plain attribute: the table is not a parameter or buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., C] -> [..., C]
        b = self.binding
        slots = b.slots_for(x.shape[:-1], x.device)
        return rational_act(x, b.table.site(self.site), slots, act=self.kind, mode=b.mode,
                            clamp=b.clamp)

    def extra_repr(self) -> str:
        return f"site={self.site}, act={self.kind}, mode={self.binding.mode}"


def classify_activation(fn: object, name: str) -> str:
    """Which of ACTIVATIONS `fn` computes, by evaluating it on a float64 probe grid (names and
    classes vary across transformers versions; the values do not)."""
    try:
        y = fn(_PROBE.clone())
    except Exception as e:  # e.g. parameters on another device: say which module failed
        raise ValueError(f"activation {name} ({type(fn).__name__}) cannot be evaluated on a "
                         f"float64 CPU probe: {e}") from e
    if not isinstance(y, torch.Tensor) or y.shape != _PROBE.shape:
        raise ValueError(f"activation {name} ({type(fn).__name__}) is not elementwise")
    y = y.double()
    for kind in ACTIVATIONS:
        if (y - base_activation(kind, _PROBE)).abs().max().item() <= _MATCH_TOL:
            return kind
    raise ValueError(f"activation {name} ({type(fn).__name__}) matches none of {ACTIVATIONS}; "
                     "only those have rational fits")


def find_sites(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(parent module, attribute, module path) of every activation site, in module order."""
    sites = []
    for path, module in model.named_modules():
        # A site's parent is a layer with weights (the MLP). This skips activation modules
        # themselves: GELUActivation keeps F.gelu as its own `act`, here and in BERT's head.
        if next(module.parameters(), None) is None:
            continue
        for attr in SITE_ATTRS:
            # a child module, or a plain function set on the instance (BERT accepts a callable
            # config.hidden_act); never a method of the class that happens to share the name
            fn = module._modules.get(attr, vars(module).get(attr))
            if callable(fn):
                sites.append((module, attr, f"{path}.{attr}" if path else attr))
    return sites


def convert_model(
    model: nn.Module, *, mode: str = "residual", groups: int = 8, slots: int = 64,
    clamp: float = 4.0, device: torch.device | str | None = None, fit: str = DEFAULT_FIT,
) -> SlotBinding:
    """Replace every activation site of `model` in place by a RationalActivation.

    mode: "replace" (y = R_slot(x), the paper's NoRA; changes base outputs by the fit error) or
    "residual" (y = act(x) + [slot != 0] (R_slot(xc) - R_0(xc)): slot 0 is exact).
    groups: table groups G (each site's channel count must be a multiple). slots: table slots S
    (slot 0 the base). device: where the table lives; default the model's parameters' device.
    fit: the shipped base fit for slot 0 ("wide", the default, keeps real models' outputs in
    replace mode; "narrow" is tighter on [-4, 4] only); recorded as binding.fit.
    The table is not part of the model's parameters or state_dict: `model.to()` does not move it.
    Returns the binding that owns the table and selects each token's slot.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    sites = find_sites(model)
    if not sites:
        raise ValueError(f"no activation sites ({', '.join(SITE_ATTRS)}) in {type(model).__name__}")
    if any(isinstance(getattr(m, a), RationalActivation) for m, a, _ in sites):
        raise ValueError("model is already converted")
    kinds = tuple(classify_activation(getattr(m, a), p) for m, a, p in sites)
    if device is None:
        device = next(model.parameters()).device
    base = torch.stack([base_coefficients(k, fit) for k in kinds]).unsqueeze(1)  # [L, 1, 10]
    table = CoefficientTable(base, slots=slots, groups=groups, device=device)
    binding = SlotBinding(table, tuple(p for _, _, p in sites), kinds, mode, clamp, fit)
    for l, ((module, attr, _), kind) in enumerate(zip(sites, kinds, strict=True)):
        setattr(module, attr, RationalActivation(l, kind, binding))
    return binding


@dataclass(frozen=True)
class Fidelity:
    """How far a converted model's outputs are from the original's, over real (unmasked)
    positions. top1_agreement: fraction of positions with the same argmax (logits only).
    pooled_cosine_min: smallest cosine between the two models' mean-pooled outputs per
    sequence (last_hidden_state only: the sentence embedding of sentence-transformers)."""

    max_abs: float
    mean_abs: float
    top1_agreement: float | None
    pooled_cosine_min: float | None


@torch.no_grad()
def fidelity(
    original: nn.Module, converted: nn.Module, inputs: dict[str, torch.Tensor], *,
    output: str = "logits",
) -> Fidelity:
    """Compare the two models' `output` ("logits" or "last_hidden_state") on the same inputs.
    The converted model runs with whatever slots are bound (none: the base, slot 0)."""
    if output not in ("logits", "last_hidden_state"):
        raise ValueError(f"output must be 'logits' or 'last_hidden_state', got {output!r}")
    a = getattr(original(**inputs), output).float()  # [B, S, V] or [B, S, H]
    b = getattr(converted(**inputs), output).float()
    mask = inputs.get("attention_mask")
    keep = (torch.ones(a.shape[:-1], dtype=torch.bool, device=a.device) if mask is None
            else mask.to(a.device).bool())  # [B, S]
    diff = (a - b).abs()[keep]  # [N, V]
    top1 = None
    if output == "logits":
        top1 = (a.argmax(-1) == b.argmax(-1))[keep].float().mean().item()
    cosine = None
    if output == "last_hidden_state":
        cosine = torch.cosine_similarity(mean_pool(a, keep), mean_pool(b, keep), dim=-1)
        cosine = cosine.min().item()
    return Fidelity(max_abs=diff.max().item(), mean_abs=diff.mean().item(),
                    top1_agreement=top1, pooled_cosine_min=cosine)


def mean_pool(hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean over kept positions: [B, S, H], [B, S] bool -> [B, H]."""
    w = keep.to(hidden.dtype).unsqueeze(-1)  # [B, S, 1]
    return (hidden * w).sum(1) / w.sum(1).clamp(min=1.0)
