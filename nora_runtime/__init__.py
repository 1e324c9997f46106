"""nora_runtime: rational activations, multi-tenant kernels, NoRA adapters, model conversion."""

from nora_runtime.ops import rational_act, rational_act_ref
from nora_runtime.rational import ACTIVATIONS, base_activation, base_coefficients, rational

__all__ = [
    "ACTIVATIONS", "base_activation", "base_coefficients", "rational", "rational_act",
    "rational_act_ref",
]
