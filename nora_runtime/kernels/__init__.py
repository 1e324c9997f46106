"""Triton kernels of the rational activation. One family per file; each public wrapper checks
shapes, dtypes and strides. `nora_runtime.ops` chooses between these and the torch reference."""
