"""``PackedValidation``: validate the model that will actually be deployed — packed integer layers.

Before a due validation run the callback builds a :class:`~lightning_quant.layers.PackedLinear` for
every fake-quant layer (QAT's ``FakeQuantLinear``, or any module with ``to_packed()``; see
``qat.packed_replacements``) — or, with ``spec=``, RTN-packs the selected float linears — swaps them in with
:func:`~lightning_quant.targets.set_submodule`, lets Lightning run validation, and swaps the very same
training modules back in ``on_validation_end``. Parameters, their identity, the optimizer state and
the RNG are untouched, so training is bit-identical with and without the callback.

What gets logged
----------------
* On due runs the LightningModule's own validation metrics (``val_loss`` ...) *are* the packed model's.
  Other runs (``every_n_epochs > 1``) validate the training (fake-quant) model as usual.
* With ``compare=True`` (default), on the same inputs and the same weights, the callback also runs
  the training modules: a forward hook on ``compare_module`` (default: the child of the
  LightningModule holding every packed layer, e.g. ``self.model``) re-runs that module with the
  fake layers swapped back, and logs the epoch means of

  - ``packed/output_rel_err`` — ``‖y_packed − y_fake‖ / ‖y_fake‖`` of the module's output (logits);
  - ``packed/kl_to_fake`` — mean per-token ``KL(p_fake ‖ p_packed)`` when the output has ``logits``;
  - ``packed/loss`` and ``packed/loss_gap`` (``packed − fake``) when the output has a ``loss``
    (e.g. a transformers model called with ``labels``).

  This doubles the validation compute of the hooked module on due runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_quant import qat
from lightning_quant.layers.packed import PackedLinear
from lightning_quant.spec import QuantSpec
from lightning_quant.targets import DEFAULT_EXCLUDE, linear_kind, select_targets, set_submodule

__all__ = ["PackedValidation", "build_packed_layers"]


@torch.no_grad()
def build_packed_layers(model: nn.Module, spec: QuantSpec | None = None, include: Sequence[str] | None = None,
                        exclude: Sequence[str] | None = DEFAULT_EXCLUDE,
                        force_reference: bool | None = None) -> dict[str, PackedLinear]:
    """``{module path: PackedLinear}`` for the current weights of ``model`` (nothing is swapped).

    Fake-quant layers are packed by :func:`lightning_quant.qat.packed_replacements` (the same conversion
    as at fit end; a merged-LoRA layer replaces its whole peft host). Without fake-quant layers, ``spec``
    RTN-packs the float linears chosen by ``include`` / ``exclude`` (a LoRA-wrapped one with its adapters
    merged in, replacing the host: the default PTQ deployment). A model that already holds
    ``PackedLinear`` layers and no fake-quant layer (converted) gives ``{}``: there is nothing to swap.
    """
    from lightning_quant.algorithms.rtn import rtn_quantize
    from lightning_quant.qat.lora import merged_weight

    fakes = qat.deployable_layers(model)
    if fakes and spec is not None:
        raise ValueError("The model has fake-quant layers, which PackedValidation packs with their own spec; "
                         "drop spec= (it is for float models only).")
    if not fakes and spec is None:
        if any(isinstance(m, PackedLinear) for m in model.modules()):
            return {}  # already converted (e.g. PTQ at fit end): validation measures the packed model as is
        raise ValueError("The model has no fake-quant layer (no module with to_packed()) and no PackedLinear; add "
                         "the QuantizationAwareTraining callback or pass PackedValidation(spec=QuantSpec(...)).")
    if fakes:
        packed = {path: layer for path, (layer, _) in qat.packed_replacements(model).items()}
    else:
        packed = {}
        for name, t in select_targets(model, include, exclude).items():
            kind = linear_kind(t.module)
            bias = kind.bias(t.module)
            qw = rtn_quantize(merged_weight(kind.weight(t.module).detach(), t.host), spec, name=name)
            packed[name] = PackedLinear.from_quantized(qw, None if bias is None else bias.detach())
    for layer in packed.values():
        layer.force_reference = force_reference
    return packed


class PackedValidation(Callback):
    """Run validation through packed integer layers built from the current weights.

    Args:
        every_n_epochs: validate packed when ``current_epoch % every_n_epochs == 0`` (else the training model).
        spec: for models without fake-quant layers: RTN-pack the float linears with this spec.
        include / exclude: module-name filters for ``spec`` mode (``lm_head`` excluded by default).
        compare: also run the training modules on the same inputs and log the fake-vs-packed gap.
        compare_module: dotted name (relative to the LightningModule; ``""`` for itself) of the module
            whose output is compared; default: the child holding every packed layer.
        force_reference: build the packed layers with this ``force_reference`` (``True``: pure-torch path).
    """

    def __init__(self, every_n_epochs: int = 1, spec: QuantSpec | None = None,
                 include: Sequence[str] | None = None, exclude: Sequence[str] | None = DEFAULT_EXCLUDE,
                 compare: bool = True, compare_module: str | None = None,
                 force_reference: bool | None = None) -> None:
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be a positive int, got {every_n_epochs!r}.")
        if spec is not None and not isinstance(spec, QuantSpec):
            raise TypeError(f"spec must be a QuantSpec or None, got {type(spec).__name__}.")
        if not isinstance(compare, bool):
            raise TypeError(f"compare must be True or False, got {compare!r}.")
        if compare_module is not None and not isinstance(compare_module, str):
            raise TypeError(f"compare_module must be a dotted module name or None, got {compare_module!r}.")
        self.every_n_epochs = every_n_epochs
        self.spec = spec
        self.include, self.exclude = include, exclude
        self.compare = compare
        self.compare_module = compare_module
        self.force_reference = force_reference
        self._originals: dict[str, nn.Module] = {}
        self._packed: dict[str, PackedLinear] = {}
        self._hook = None
        self._in_fake_pass = False
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        #: metrics of the last packed validation run (``packed/*`` keys), for inspection after fit
        self.last_metrics: dict[str, float] = {}

    # ---- hooks ------------------------------------------------------------------------------
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch % self.every_n_epochs == 0:
            self._swap_in(pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._originals or not self._counts:
            return
        self.last_metrics = {k: self._sums[k] / self._counts[k] for k in self._sums}
        for key, value in self.last_metrics.items():
            pl_module.log(key, value, on_epoch=True, sync_dist=True)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._swap_out(pl_module)

    # ---- swapping ---------------------------------------------------------------------------
    def _swap_in(self, pl_module: pl.LightningModule) -> None:
        self._packed = build_packed_layers(pl_module, self.spec, self.include, self.exclude, self.force_reference)
        self._originals = {path: set_submodule(pl_module, path, layer) for path, layer in self._packed.items()}
        self._sums, self._counts = {}, {}
        if self.compare and self._originals:
            target = self._compare_target(pl_module)
            self._hook = target.register_forward_hook(self._compare_hook, with_kwargs=True)

    def _swap_out(self, pl_module: pl.LightningModule) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for path, module in self._originals.items():
            set_submodule(pl_module, path, module)
        self._originals, self._packed = {}, {}

    def _set_layers(self, pl_module: nn.Module, layers: dict[str, nn.Module]) -> None:
        for path, module in layers.items():
            set_submodule(pl_module, path, module)

    def _compare_target(self, pl_module: nn.Module) -> nn.Module:
        if self.compare_module is not None:
            try:
                return pl_module.get_submodule(self.compare_module)
            except AttributeError as err:
                raise ValueError(f"compare_module={self.compare_module!r} is not a submodule of "
                                 f"{type(pl_module).__name__}; use a dotted name such as 'model'.") from err
        heads = {path.split(".")[0] for path in self._originals}
        return pl_module.get_submodule(heads.pop()) if len(heads) == 1 else pl_module

    # ---- fake-vs-packed comparison ----------------------------------------------------------
    def _compare_hook(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if self._in_fake_pass:
            return
        root = self._root
        self._in_fake_pass = True
        try:
            self._set_layers(root, self._originals)
            with torch.no_grad():
                fake = module(*args, **kwargs)
        finally:
            self._set_layers(root, self._packed)
            self._in_fake_pass = False
        self._accumulate(output, fake)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._root = pl_module

    def _accumulate(self, packed_out, fake_out) -> None:
        yp, yf = _main_tensor(packed_out).detach().float(), _main_tensor(fake_out).detach().float()
        self._add("packed/output_rel_err", (torch.linalg.vector_norm(yp - yf) /
                                            torch.linalg.vector_norm(yf).clamp_min(1e-30)).item())
        if getattr(packed_out, "logits", None) is not None:
            logp, logq = torch.log_softmax(yf, -1), torch.log_softmax(yp, -1)
            kl = (logp.exp() * (logp - logq)).sum(-1)  # [..., tokens]
            self._add("packed/kl_to_fake", kl.mean().item(), kl.numel())
        loss_p, loss_f = getattr(packed_out, "loss", None), getattr(fake_out, "loss", None)
        if loss_p is not None and loss_f is not None:
            self._add("packed/loss", loss_p.item())
            self._add("packed/loss_gap", loss_p.item() - loss_f.item())

    def _add(self, key: str, value: float, weight: int = 1) -> None:
        self._sums[key] = self._sums.get(key, 0.0) + value * weight
        self._counts[key] = self._counts.get(key, 0) + weight

    # ---- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"every_n_epochs": self.every_n_epochs, "last_metrics": dict(self.last_metrics)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_metrics = dict(state_dict.get("last_metrics", {}))


def _main_tensor(out) -> Tensor:
    """The tensor to compare: ``out.logits``, ``out`` itself, or the first tensor of a tuple/list."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"PackedValidation cannot compare outputs of type {type(out).__name__}; set "
                    "compare_module= to a module returning a tensor or an object with .logits, or compare=False.")
