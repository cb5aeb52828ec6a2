"""Compute kernels: one file per family. Each has a ``@triton.jit`` kernel (CUDA), a
``torch.library`` custom op with a fake (shape-only) implementation, a public wrapper that checks
shapes/dtypes, and a pure-torch reference that is also the CPU fallback.
"""
