"""Quantization specifications: *how* to quantize, validated once at construction.

Every later piece (QAT, RTN, GPTQ, AWQ, packing, kernels, exporters) reads these frozen
dataclasses instead of loose keyword arguments.

Code convention (one for the whole project, shared with GPTQ / compressed-tensors):
integer codes are *unsigned*, ``q in [0, 2**bits - 1]``, and ``w = (q - z) * s``.

* symmetric:  ``s = 2 * absmax / (2**bits - 1)``, ``z = 2**(bits - 1)`` (implicit, not stored).
  At 4 bits the signed value ``q - 8`` spans ``[-8, 7]`` and ``s = absmax / 7.5`` — exactly the
  scale GPTQ (``sym=True``) and compressed-tensors (``symmetric: true``) use.
* asymmetric: ``s = (max - min) / (2**bits - 1)`` over a range that always contains 0,
  ``z = round(-min / s)`` clamped to the code range (an integer, as GPTQ and AWQ store it).

Groups: ``group_size = -1`` is one group per output row (per channel). Otherwise the input
features are split into ``ceil(in_features / group_size)`` consecutive groups and, when
``in_features`` is not a multiple of ``group_size``, **the last group is partial** (e.g. SmolLM2's
576 = 4 x 128 + 64). Every consumer (packing, kernels, exporters) understands a partial last group;
formats that cannot store one (AWQ GEMM) raise at export time naming the group sizes that divide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

ALLOWED_BITS = (2, 3, 4, 8)
ALLOWED_ACT_BITS = (8,)
_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

__all__ = ["ALLOWED_BITS", "QPARAM_OBJECTIVES", "ActivationSpec", "QParamSearch", "QuantSpec"]

#: What :class:`QParamSearch` minimises per (row, group).
QPARAM_OBJECTIVES = ("weight", "hessian")


class _UnsignedGrid:
    """The unsigned integer grid of a ``bits``-wide spec (weights and activations alike)."""

    bits: int

    @property
    def qmax(self) -> int:
        """Largest unsigned code, ``2**bits - 1``."""
        return (1 << self.bits) - 1

    @property
    def midpoint(self) -> int:
        """The implicit zero point of symmetric codes, ``2**(bits - 1)``."""
        return 1 << (self.bits - 1)


@dataclass(frozen=True)
class QuantSpec(_UnsignedGrid):
    """How to quantize a weight matrix ``[out_features, in_features]``.

    Args:
        bits: code width, one of 2, 3, 4, 8.
        group_size: ``-1`` for one scale per output channel, else the number of consecutive input
            features that share a scale (a positive integer; 32, 64 or 128 are typical).
        symmetric: symmetric codes with an implicit zero point ``2**(bits-1)``; ``False`` stores an
            integer zero point per group.
        scale_dtype: scales are rounded to this dtype *before* codes are computed, so the codes
            are exact for the scales that get stored (GPTQ/AWQ checkpoints store float16).
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    scale_dtype: Literal["float16", "bfloat16", "float32"] = "float16"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in ALLOWED_BITS:
            raise ValueError(f"QuantSpec.bits={self.bits!r} is not supported; use one of {ALLOWED_BITS}.")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
            raise TypeError(f"QuantSpec.group_size must be an int (-1 or a positive value), got {self.group_size!r}.")
        if self.group_size == 0 or self.group_size < -1:
            raise ValueError(
                f"QuantSpec.group_size={self.group_size} is invalid; use -1 (per output channel) "
                "or a positive group size such as 32, 64 or 128."
            )
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"QuantSpec.symmetric must be True or False, got {self.symmetric!r}.")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ValueError(
                f"QuantSpec.scale_dtype={self.scale_dtype!r} is not supported; use one of {tuple(_SCALE_DTYPES)}."
            )

    # ---- derived quantities -------------------------------------------------------------
    @property
    def torch_scale_dtype(self) -> torch.dtype:
        """Scales are stored in (and rounded to) this dtype; exporters write it unchanged."""
        return _SCALE_DTYPES[self.scale_dtype]

    def effective_group_size(self, in_features: int) -> int:
        """Group size actually used for a layer with ``in_features`` inputs."""
        return in_features if self.group_size == -1 else self.group_size

    def num_groups(self, in_features: int) -> int:
        """``ceil(in_features / group_size)`` (1 for per-channel); the last group may be partial."""
        self.check_in_features(in_features)
        return math.ceil(in_features / self.effective_group_size(in_features))

    def check_in_features(self, in_features: int) -> None:
        """Raise if a layer with ``in_features`` inputs cannot use this spec."""
        if in_features <= 0:
            raise ValueError(f"in_features must be positive, got {in_features}.")
        if self.group_size != -1 and self.group_size > in_features:
            raise ValueError(
                f"group_size={self.group_size} is larger than the layer's in_features={in_features}; "
                f"use group_size=-1 (per channel) or a group size <= {in_features}."
            )

    def to_dict(self) -> dict:
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "scale_dtype": self.scale_dtype,
        }

    @classmethod
    def from_dict(cls, d: dict) -> QuantSpec:
        allowed = {"bits", "group_size", "symmetric", "scale_dtype"}
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(f"Unknown QuantSpec keys {sorted(unknown)}; allowed: {sorted(allowed)}.")
        return cls(**d)

    def __str__(self) -> str:
        g = "ch" if self.group_size == -1 else f"g{self.group_size}"
        return f"W{self.bits}{g}{'' if self.symmetric else '-asym'}"


@dataclass(frozen=True)
class ActivationSpec(_UnsignedGrid):
    """Dynamic activation quantization for W4A8 / W8A8 schemes.

    Activations are quantized per token (one scale per row of the flattened input) at runtime.
    Only 8-bit is supported; asymmetric (the default) stores a zero point per token.
    """

    bits: int = 8
    symmetric: bool = False
    granularity: Literal["per_token"] = "per_token"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in ALLOWED_ACT_BITS:
            raise ValueError(f"ActivationSpec.bits={self.bits!r} is not supported; use one of {ALLOWED_ACT_BITS}.")
        if self.granularity != "per_token":
            raise ValueError(
                f"ActivationSpec.granularity={self.granularity!r} is not supported; use 'per_token'."
            )
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"ActivationSpec.symmetric must be True or False, got {self.symmetric!r}.")

    def to_dict(self) -> dict:
        return {"bits": self.bits, "symmetric": self.symmetric, "granularity": self.granularity}


@dataclass(frozen=True)
class QParamSearch:
    """Grid search of per-(row, group) qparams: shrink the min-max range by ``c`` and keep the ``c`` with
    the least error (GPTQ's reference ``Quantizer(mse=True)``, Frantar et al. 2023; GPTQModel's ``mse``;
    llm-compressor's ``mse`` observer; AWQ's clip search, Lin et al. 2024 §3.3).

    Ratios tried: ``c_i = 1 − max_shrink · i / steps``, ``i = 0 .. steps−1`` (``c = 1`` is min-max, so the
    search never does worse than min-max on its own objective). Each ``c`` scales both ends of the range
    (``lo·c``, ``hi·c``), and the scale / zero point follow from that range as in
    :func:`~lightning_quant.primitives.qparams_from_minmax`.

    Args:
        steps: grid points (80 with ``max_shrink=0.8`` is GPTQ's ``grid=100, maxshrink=0.8``).
        max_shrink: the smallest range tried is ``(1 − max_shrink)`` of min-max; in ``[0, 1)``.
        objective: ``"weight"`` — ``Σ |w − Q_c(w)|^norm`` over the group; ``"hessian"`` — the group's output
            error ``d H_g d^T`` with ``H_g`` the group's diagonal block of ``H = 2 X^T X / n`` (needs
            calibration inputs: GPTQ and AWQ, not plain RTN).
        norm: the exponent of the ``"weight"`` objective (2.4 in GPTQ's reference code); ``> 0``.
    """

    steps: int = 80
    max_shrink: float = 0.8
    objective: Literal["weight", "hessian"] = "weight"
    norm: float = 2.4

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"QParamSearch.steps={self.steps!r} must be an int >= 1 (80 is GPTQ's grid).")
        ms = self.max_shrink
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not 0.0 <= ms < 1.0:
            raise ValueError(f"QParamSearch.max_shrink={ms!r} must be in [0, 1): the smallest range tried is "
                             f"(1 - max_shrink) of min-max; 0.8 (GPTQ) or 0.5 (AWQ) are typical.")
        if self.objective not in QPARAM_OBJECTIVES:
            raise ValueError(f"QParamSearch.objective={self.objective!r} is not supported; use one of {QPARAM_OBJECTIVES}.")
        n = self.norm
        if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
            raise ValueError(f"QParamSearch.norm={n!r} must be a finite number > 0; 2.0 (squared error) or 2.4 "
                             "(GPTQ's reference) are typical.")

    @property
    def ratios(self) -> list[float]:
        """The shrink factors tried, largest (``1.0``) first."""
        return [1.0 - self.max_shrink * i / self.steps for i in range(self.steps)]
