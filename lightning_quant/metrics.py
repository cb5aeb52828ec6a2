"""torchmetrics ``Metric``s for quantization quality. They sync under DDP like any torchmetrics metric.

* :class:`LayerQuantizationError` — per-layer relative output error and SQNR between a float
  layer and its quantized counterpart, accumulated over batches (states are sums, reduced with
  ``sum`` across processes, so the DDP result equals the single-process one on the same data).
* Perplexity: use :class:`torchmetrics.text.Perplexity` (re-exported here), not a hand-written one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.text import Perplexity

__all__ = ["LayerQuantizationError", "Perplexity"]


class LayerQuantizationError(Metric):
    """Relative error ``||y_q − y||² / ||y||²`` and SQNR ``10·log10(||y||² / ||y_q − y||²)`` per layer.

    Args:
        layer_names: the layers tracked, in order; ``update(name, reference, quantized)`` takes
            one layer's float and quantized outputs (any matching shapes).

    ``compute()`` returns ``{"relative_error": [L], "sqnr_db": [L]}`` tensors in ``layer_names`` order.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, layer_names: Sequence[str], **kwargs) -> None:
        super().__init__(**kwargs)
        names = list(layer_names)
        if not names:
            raise ValueError("LayerQuantizationError needs at least one layer name.")
        if len(set(names)) != len(names):
            raise ValueError("LayerQuantizationError: layer names must be unique.")
        self.layer_names = names
        self._index = {n: i for i, n in enumerate(names)}
        self.add_state("sq_err", default=torch.zeros(len(names), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sq_ref", default=torch.zeros(len(names), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(len(names), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, name: str, reference: Tensor, quantized: Tensor) -> None:  # type: ignore[override]
        if name not in self._index:
            raise KeyError(f"Unknown layer {name!r}; tracked layers: {self.layer_names[:5]}...")
        if reference.shape != quantized.shape:
            raise ValueError(f"{name}: reference {tuple(reference.shape)} and quantized {tuple(quantized.shape)} outputs differ in shape.")
        i = self._index[name]
        ref = reference.detach().double()
        self.sq_err[i] += (quantized.detach().double() - ref).pow(2).sum()
        self.sq_ref[i] += ref.pow(2).sum()
        self.count[i] += ref.numel()

    def compute(self) -> dict[str, Tensor]:
        if bool((self.count == 0).any()):
            missing = [n for n, c in zip(self.layer_names, self.count.tolist()) if c == 0]
            raise RuntimeError(f"No outputs were recorded for {missing[:5]}; call update() for every tracked layer.")
        rel = self.sq_err / self.sq_ref.clamp_min(1e-30)
        sqnr = 10.0 * torch.log10(self.sq_ref.clamp_min(1e-30) / self.sq_err.clamp_min(1e-30))
        return {"relative_error": rel.float(), "sqnr_db": sqnr.float()}

    def as_rows(self) -> list[dict]:
        """``[{"layer", "relative_error", "sqnr_db"}]`` for tables and reports."""
        out = self.compute()
        return [
            {"layer": n, "relative_error": float(out["relative_error"][i]), "sqnr_db": float(out["sqnr_db"][i])}
            for i, n in enumerate(self.layer_names)
        ]
