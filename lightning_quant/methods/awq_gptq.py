"""AWQ then GPTQ (llm-compressor's documented ``AWQModifier`` + ``GPTQModifier`` recipe), ``method="awq+gptq"``.

1. AWQ (:func:`~lightning_quant.methods.awq.awq_method`) searches the per-channel scales ``s``
   of each group sharing an input (Lin et al. 2024, "AWQ", §3.2) and its clip factors;
2. the scales are folded into the model (:func:`~lightning_quant.methods.awq.fold_awq_scales`:
   producers divided by ``s``, each quantized layer's weight becomes ``W diag(s)``; float outputs unchanged);
3. GPTQ (:func:`~lightning_quant.methods.gptq.gptq_method`) calibrates the folded model and
   quantizes the scaled weights with error feedback. AWQ's clip factors are not reused: GPTQ picks its
   own group qparams (min-max or ``GPTQConfig.qparam_search``).

Two calibration passes (AWQ's search needs float block outputs; GPTQ's Hessians must see the scaled
inputs). The config is a :class:`~lightning_quant.algorithms.gptq.GPTQConfig` whose ``awq`` field holds the
:class:`~lightning_quant.algorithms.awq.AWQConfig` (``None``: defaults). The result is an ordinary GPTQ
weight per layer, so every exporter (gptq, awq, compressed-tensors, onnx) writes it; the model keeps its
folded norms / producers (the method's one change to the float model, outputs unchanged).
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from lightning_quant.algorithms.awq import AWQConfig
from lightning_quant.algorithms.gptq import GPTQConfig
from lightning_quant.methods.awq import awq_method, fold_awq_scales
from lightning_quant.methods.gptq import gptq_method
from lightning_quant.methods.registry import MethodResult, register_method
from lightning_quant.spec import QuantSpec

__all__ = ["awq_gptq_method"]


def awq_gptq_method(model: nn.Module, targets: dict[str, nn.Module], spec: QuantSpec, calibration,
                    config: GPTQConfig | None) -> MethodResult:
    """The AWQ-scaled weights, GPTQ-quantized (GPTQ's figures plus ``awq_ratio``); folds AWQ's scales into ``model``."""
    cfg = config or GPTQConfig()
    awq_cfg = cfg.awq or AWQConfig(batch_size=cfg.batch_size, block_path=cfg.block_path, device=cfg.device,
                                   progress=cfg.progress)
    scaled = awq_method(model, targets, spec, calibration, awq_cfg)
    fold_awq_scales(model, scaled)
    out = gptq_method(model, targets, spec, calibration, replace(cfg, awq=None))
    figures = {n: {**out.figures.get(n, {}), **({"awq_ratio": scaled.figures[n]["awq_ratio"]} if n in scaled.figures else {})}
               for n in out}
    return MethodResult(out.weights, figures={n: f for n, f in figures.items() if f})


register_method("awq+gptq", awq_gptq_method, needs_calibration=True, config_type=GPTQConfig)
