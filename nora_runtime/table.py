"""The coefficient table: one static device buffer holding every resident adapter's coefficients.

    data: [S, L, G, 10] float32     S slots, L activation sites, G groups, a0..a5 b0..b3

Slot 0 is the base (no adapter) and is read-only. Loading an adapter copies its merged
coefficients into a slot in place; `data` is never reallocated, so CUDA graphs captured with a
pointer to it stay valid across hot swaps (DESIGN.md s2). The rational kernels read one site at
a time through `site(l)`, a [S, G, 10] view.

On a GPU, writes go through a side stream of their own: a load copies 10 KiB while the serving
loop's forward pass runs on the default stream, instead of queueing behind it (the slot written
is one that no running request reads).
"""

from __future__ import annotations

import torch

from nora_runtime.rational import N_COEF


def expand_groups(coefs: torch.Tensor, groups: int) -> torch.Tensor:
    """[L, G', 10] -> [L, groups, 10]: each of the G' groups covers groups / G' table groups.

    Contiguous channel groups nest: with C channels, group g' of G' holds the channels of table
    groups g' * k .. g' * k + k - 1 (k = groups / G'), so repeat_interleave keeps every channel's
    coefficients (DESIGN.md s1, "group extend").
    """
    if coefs.dim() != 3 or coefs.shape[2] != N_COEF:
        raise ValueError(f"coefficients must be [L, G', {N_COEF}], got {tuple(coefs.shape)}")
    g = coefs.shape[1]
    if g == 0 or groups % g:
        raise ValueError(f"table groups G={groups} must be a multiple of the coefficients' G'={g}")
    return coefs.repeat_interleave(groups // g, dim=1)


class CoefficientTable:
    """Static [S, L, G, 10] float32 table of per-slot, per-site, per-group coefficients.

    base: [L, G_b, 10] (per site and group; G % G_b == 0) or [10] (one row for every site and
    group, `sites` then required). Slot 0 holds it for good; slots 1..S-1 start as copies of it,
    i.e. "no adapter".
    """

    def __init__(
        self, base: torch.Tensor, *, slots: int, groups: int, sites: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if slots < 1 or groups < 1:
            raise ValueError(f"need slots >= 1 and groups >= 1, got {slots=} {groups=}")
        if base.dim() == 1:
            if sites is None:
                raise ValueError("a [10] base row needs `sites` (the number of activation sites)")
            base = base.expand(sites, 1, -1)
        elif sites is not None and base.shape[0] != sites:
            raise ValueError(f"base has {base.shape[0]} sites, expected {sites}")
        base = expand_groups(base.float(), groups)  # [L, G, 10]
        _check_finite(base, "base coefficients")
        self.data = base.to(device).unsqueeze(0).repeat(slots, 1, 1, 1).contiguous()
        self._stream = None
        if self.data.is_cuda:  # the side stream must not wait for the serving loop's work, so
            torch.cuda.synchronize(self.data.device)  # `data` is complete before any write
            self._stream = torch.cuda.Stream(self.data.device)

    @property
    def num_slots(self) -> int:
        return self.data.shape[0]

    @property
    def num_sites(self) -> int:
        return self.data.shape[1]

    @property
    def groups(self) -> int:
        return self.data.shape[2]

    def site(self, l: int) -> torch.Tensor:
        """Coefficients of activation site l for all slots: a [S, G, 10] view (row-contiguous,
        as the kernels require)."""
        return self.data[:, l]

    def write(self, slot: int, coefs: torch.Tensor) -> None:
        """Copy an adapter's merged coefficients [L, G', 10] into `slot`, in place."""
        self._check_writable(slot)
        if coefs.dim() != 3 or coefs.shape[0] != self.num_sites:
            raise ValueError(f"coefficients must be [L={self.num_sites}, G', {N_COEF}], "
                             f"got {tuple(coefs.shape)}")
        coefs = expand_groups(coefs.float(), self.groups)
        _check_finite(coefs, f"coefficients for slot {slot}")
        if self._stream is not None:  # from pinned host memory: the side stream waits for
            coefs = coefs.cpu().pin_memory()  # nothing on the default stream (module docstring)
        self._copy(slot, coefs)

    def clear(self, slot: int) -> None:
        """Reset `slot` to the base (no adapter), in place."""
        self._check_writable(slot)
        self._copy(slot, self.data[0])

    def _copy(self, slot: int, src: torch.Tensor) -> None:
        """data[slot] = src, complete when this returns."""
        if self._stream is None:
            self.data[slot].copy_(src)
            return
        with torch.cuda.stream(self._stream):
            self.data[slot].copy_(src, non_blocking=True)
        self._stream.synchronize()

    def _check_writable(self, slot: int) -> None:
        if slot == 0:
            raise ValueError("slot 0 holds the base coefficients and is read-only")
        if not 0 < slot < self.num_slots:
            raise ValueError(f"slot {slot} out of range 1..{self.num_slots - 1}")


def _check_finite(coefs: torch.Tensor, what: str) -> None:
    # A NaN or inf row would silently poison every token of its slot; refuse it at load.
    if not torch.isfinite(coefs).all():
        raise ValueError(f"{what} contain NaN or inf")
