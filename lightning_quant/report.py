"""The quantization report: figures computed from a float model and its quantized counterpart,
written as ``report.md`` + PNG plots (matplotlib, Agg backend, imported lazily).

:func:`build_report` measures; :func:`write_report` renders; :mod:`lightning_quant.integrations.tracking`
sends the same figures to the Trainer's loggers.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_quant.evaluation import layer_output_errors, perplexity
from lightning_quant.quantized import QuantizedWeight
from lightning_quant.targets import linear_weight

__all__ = ["LayerRow", "ReportData", "build_report", "model_bytes", "quantized_weights_of", "write_report"]


@dataclass
class LayerRow:
    layer: str
    shape: tuple[int, int]
    spec: str
    bits_per_weight: float
    relative_error: float
    sqnr_db: float


@dataclass
class ReportData:
    rows: list[LayerRow]
    float_bytes: int
    quant_bytes: int
    ppl_before: float | None = None
    ppl_after: float | None = None
    extra: dict[str, float] = field(default_factory=dict)
    #: worst layers' float weights, dequantized weights and scales (for the histograms)
    samples: dict[str, dict[str, Tensor]] = field(default_factory=dict)

    def with_prefix(self, prefix: str) -> ReportData:
        """The same figures with every layer name prefixed by ``prefix`` (``"model"``: names relative to a
        LightningModule whose ``model`` attribute was measured); itself for ``""``."""
        if not prefix:
            return self
        rows = [replace(r, layer=f"{prefix}.{r.layer}") for r in self.rows]
        samples = {f"{prefix}.{k}": v for k, v in self.samples.items()}
        return replace(self, rows=rows, samples=samples)

    @property
    def mean_bits_per_weight(self) -> float:
        n = [r.shape[0] * r.shape[1] for r in self.rows]
        return sum(r.bits_per_weight * k for r, k in zip(self.rows, n)) / max(sum(n), 1)

    def summary(self) -> dict[str, float]:
        """Scalar figures, the same for every logger."""
        out = {
            "quant/bits_per_weight": self.mean_bits_per_weight,
            "quant/model_mb_before": self.float_bytes / 2**20,
            "quant/model_mb_after": self.quant_bytes / 2**20,
            "quant/size_ratio": self.quant_bytes / max(self.float_bytes, 1),
            "quant/mean_relative_error": sum(r.relative_error for r in self.rows) / max(len(self.rows), 1),
            "quant/layers": float(len(self.rows)),
        }
        if self.ppl_before is not None:
            out["quant/ppl_before"] = self.ppl_before
        if self.ppl_after is not None:
            out["quant/ppl_after"] = self.ppl_after
        out.update(self.extra)
        return out


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (tied tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def quantized_weights_of(model: nn.Module) -> dict[str, QuantizedWeight]:
    """``{name: QuantizedWeight}`` of every module that can give one (packed or fake-quant layers)."""
    out = {}
    for name, m in model.named_modules():
        if hasattr(m, "to_quantized") and callable(m.to_quantized):
            out[name] = m.to_quantized()
        elif hasattr(m, "quantized_weight") and callable(m.quantized_weight):
            out[name] = m.quantized_weight()
    if not out:
        raise ValueError("The model has no quantized layers (PackedLinear or fake-quant); convert it before reporting.")
    return out


def _float_weight(module: nn.Module) -> Tensor:
    """``[out, in]`` float weight of a linear-like module; for a peft LoRA layer, ``W + Σ scaling·B@A``."""
    from lightning_quant.qat.lora import is_tuner_layer, merged_weight

    if is_tuner_layer(module):
        return merged_weight(linear_weight(module.get_base_layer()), module)
    return linear_weight(module)


@torch.no_grad()
def build_report(
    float_model: nn.Module, quant_model: nn.Module, batches: list[Tensor], worst_k: int = 3, eval_ppl: bool = True
) -> ReportData:
    """Measure per-layer output errors, sizes and (optionally) perplexity on ``batches`` of token ids."""
    if not batches:
        raise ValueError("build_report needs at least one batch of token ids.")
    weights = quantized_weights_of(quant_model)
    names = list(weights)
    metric = layer_output_errors(float_model, quant_model, names, batches)
    rows = [
        LayerRow(r["layer"], tuple(weights[r["layer"]].shape), str(weights[r["layer"]].spec),
                 weights[r["layer"]].bits_per_weight(), r["relative_error"], r["sqnr_db"])
        for r in metric.as_rows()
    ]
    data = ReportData(rows, model_bytes(float_model), model_bytes(quant_model))
    if eval_ppl:
        windows = torch.cat(batches)
        data.ppl_before = perplexity(float_model, windows)
        data.ppl_after = perplexity(quant_model, windows)
    for r in sorted(rows, key=lambda r: -r.relative_error)[:worst_k]:
        qw = weights[r.layer]
        data.samples[r.layer] = {
            "float": _float_weight(float_model.get_submodule(r.layer)).detach().float().flatten(),
            "dequantized": qw.dequantize(torch.float32).flatten(),
            "scales": qw.scales.flatten(),
        }
    return data


def _short_names(rows: list[LayerRow]) -> list[str]:
    """Layer names without their common dotted prefix (``model.base_model.model.model.layers.``)."""
    names = [r.layer for r in rows]
    prefix = os.path.commonprefix(names) if len(names) > 1 else ""
    prefix = prefix[: prefix.rfind(".") + 1]
    return [n[len(prefix):] for n in names]


def _layer_axis(ax, rows: list[LayerRow], max_labels: int = 60) -> None:
    """x ticks of a per-layer bar chart: every layer up to ``max_labels``, else every k-th."""
    step = max(1, -(-len(rows) // max_labels))
    ticks = list(range(0, len(rows), step))
    names = _short_names(rows)
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=90, fontsize=6)
    ax.set_xlim(-1, len(rows))


def _plot_errors(data: ReportData, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(min(16, max(6, 0.18 * len(data.rows))), 4.5))
    ax.bar(range(len(data.rows)), [r.relative_error for r in data.rows], color="tab:red")
    ax.set_yscale("log")
    ax.set_ylabel("relative output error  ||y_q - y||² / ||y||²")
    _layer_axis(ax, data.rows)
    ax.set_title("Per-layer quantization error (float inputs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_histograms(data: ReportData, path: Path) -> None:
    """Per worst layer: float vs dequantized weights, the rounding error, and the group scales."""
    import matplotlib.pyplot as plt

    k = len(data.samples)
    fig, axes = plt.subplots(k, 3, figsize=(13, 2.8 * k), squeeze=False)
    for i, (name, s) in enumerate(data.samples.items()):
        lo, hi = float(s["float"].min()), float(s["float"].max())
        ax = axes[i]
        ax[0].hist(s["float"].numpy(), bins=100, range=(lo, hi), alpha=0.6, label="float")
        ax[0].hist(s["dequantized"].numpy(), bins=100, range=(lo, hi), histtype="step", color="tab:orange", label="dequantized")
        ax[0].set_yscale("log")
        ax[0].set_title(f"{name}: weights", fontsize=8)
        ax[0].legend(fontsize=7)
        ax[1].hist((s["dequantized"] - s["float"]).numpy(), bins=80, color="tab:purple")
        ax[1].set_title(f"{name}: rounding error w_q - w", fontsize=8)
        ax[2].hist(s["scales"].numpy(), bins=60, color="tab:green")
        ax[2].set_title(f"{name}: group scales", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_bits(data: ReportData, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(min(16, max(6, 0.18 * len(data.rows))), 4))
    ax.bar(range(len(data.rows)), [r.bits_per_weight for r in data.rows], color="tab:blue")
    ax.axhline(data.mean_bits_per_weight, color="k", ls="--", lw=1, label=f"mean {data.mean_bits_per_weight:.3f}")
    ax.set_ylabel("bits per weight (incl. scales/zeros)")
    _layer_axis(ax, data.rows)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(data: ReportData, out_dir: str | Path, title: str = "Quantization report") -> dict[str, Path]:
    """Write ``report.md`` and three PNGs into ``out_dir``; returns ``{name: path}``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"errors": out / "layer_errors.png", "histograms": out / "worst_layers.png", "bits": out / "bits_per_weight.png"}
    _plot_errors(data, paths["errors"])
    _plot_histograms(data, paths["histograms"])
    _plot_bits(data, paths["bits"])
    lines = [f"# {title}", "", "| figure | value |", "|---|---|"]
    for k, v in data.summary().items():
        lines.append(f"| {k} | {v:.4f} |" if not math.isnan(v) else f"| {k} | nan |")
    lines += ["", "![per-layer error](layer_errors.png)", "", "![worst layers](worst_layers.png)", "",
              "![bits per weight](bits_per_weight.png)", "", "| layer | shape | spec | bits/weight | rel. error | SQNR (dB) |",
              "|---|---|---|---|---|---|"]
    for r in data.rows:
        lines.append(f"| {r.layer} | {r.shape[0]}x{r.shape[1]} | {r.spec} | {r.bits_per_weight:.3f} | "
                     f"{r.relative_error:.3e} | {r.sqnr_db:.2f} |")
    paths["report"] = out / "report.md"
    paths["report"].write_text("\n".join(lines) + "\n")
    return paths
