"""Second-order statistics of a layer's inputs, shared by GPTQ and AWQ: ``H = 2 X^T X / N`` and the
output error ``tr(D H D^T) / 2`` it prices a weight change ``D`` with (Frantar et al. 2023, "GPTQ", eq. 1-2)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_quant import primitives as P
from lightning_quant.calibration.distributed import all_reduce_sum

__all__ = ["HessianAccumulator", "output_error"]


class HessianAccumulator:
    """Running ``Σ x x^T`` and token count for one layer (or for all layers reading the same input);
    ``H = 2 Σ x x^T / n``.

    Each batch's ``x^T x`` is computed in float32 (as GPTQ's reference implementation does, at half
    the cost of float64 on CPU) and summed over batches in float64, so adding batch by batch equals
    adding all rows at once up to float32 rounding of one batch's product.

    With ``cross=True`` it also keeps GPTAQ's cross term ``Σ (x_f − x) x^T`` (Li et al. 2025, "GPTAQ"):
    :meth:`add` then takes the float model's input ``x_f`` of the same tokens beside the quantized
    model's ``x``, and :meth:`cross_term` returns ``2 Σ (x_f − x) x^T / n`` (``[in, in]``, the scale of ``H``).
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu", name: str = "layer",
                 cross: bool = False) -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.cross = torch.zeros_like(self.sum) if cross else None
        self.name = name

    def _rows(self, x: Tensor) -> Tensor:
        x = x.detach().reshape(-1, x.shape[-1])
        if x.shape[1] != self.sum.shape[0]:
            raise ValueError(f"{self.name}: inputs have {x.shape[1]} features, expected {self.sum.shape[0]}.")
        return x.to(self.sum.device, torch.float32)  # NaN/Inf propagate into the sum: checked in hessian()

    def add(self, x: Tensor, x_float: Tensor | None = None) -> None:
        """Accumulate inputs ``x [tokens, in]`` (any leading shape is flattened); with ``cross=True`` also
        ``x_float``, the float model's inputs for the same tokens (required then, refused otherwise)."""
        x = self._rows(x)
        if (x_float is None) != (self.cross is None):
            raise ValueError(f"{self.name}: x_float is given exactly when the accumulator keeps the cross term "
                             f"(HessianAccumulator(cross=True)).")
        self.sum += x.t() @ x  # [in, tokens] @ [tokens, in], float32 -> float64 sum
        self.count += x.shape[0]
        if self.cross is not None:
            xf = self._rows(x_float)
            if xf.shape != x.shape:
                raise ValueError(f"{self.name}: float inputs {tuple(xf.shape)} do not pair with the quantized "
                                 f"model's {tuple(x.shape)}; both streams must see the same tokens.")
            self.cross += (xf - x).t() @ x

    def all_reduce(self) -> None:
        """Sum statistics over DDP ranks (no-op in one process)."""
        all_reduce_sum(self.sum)
        all_reduce_sum(self.count)
        if self.cross is not None:
            all_reduce_sum(self.cross)

    def cross_term(self) -> Tensor:
        """GPTAQ's ``2 Σ (x_f − x) x^T / n`` as float32 ``[in, in]`` (needs ``cross=True``)."""
        if self.cross is None:
            raise ValueError(f"{self.name}: this accumulator keeps no cross term; create it with cross=True.")
        if float(self.count) == 0:
            raise ValueError(f"{self.name} saw no calibration tokens; give calibration data that reaches this layer.")
        c = (2.0 * self.cross / self.count).float()
        P.check_finite(c, f"The GPTAQ cross term of {self.name} (from its calibration inputs)")
        return c

    def hessian(self) -> Tensor:
        """``H = 2 Σ x x^T / n`` as float32 ``[in, in]``."""
        if float(self.count) == 0:
            raise ValueError(f"{self.name} saw no calibration tokens; give calibration data that reaches this layer.")
        h = (2.0 * self.sum / self.count).float()
        P.check_finite(h, f"The Hessian of {self.name} (from its calibration inputs)")
        return h


def output_error(weight: Tensor, q: Tensor, hessian: Tensor) -> float:
    """``tr(D H D^T) / 2`` for ``D = weight − q`` (``[out, in]``), ``H [in, in]``."""
    d = weight.float() - q.float()
    return float(((d @ hessian.float()) * d).sum() / 2)
