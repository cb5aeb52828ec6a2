"""The HF-style directory shared by the gptq / awq / compressed-tensors / int8 formats.

Layout: ``config.json`` (the model config plus the ``quantization_config`` the target stack
reads), ``model.safetensors`` (sharded with an index above the shard size), tokenizer files when
given. Each format supplies a :class:`LayerCodec`: how one quantized layer becomes named tensors
and back, and its ``quantization_config``. Everything else (embeddings, norms, unquantized
linears such as ``lm_head``) is written as is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_quant.export import io
from lightning_quant.export.registry import ExportFormat, SaveOptions
from lightning_quant.targets import linear_weight, set_submodule

__all__ = ["LayerCodec", "build_model", "check_plain", "config_dict", "hf_format", "load_plain", "model_dtype",
           "plain_tensors", "quantized_layers", "take"]


@dataclass(frozen=True)
class LayerCodec:
    """How one format stores a quantized layer.

    Attributes:
        layer_type: the in-memory layer class the format holds (``PackedLinear``, ``Int8OutlierLinear``).
        marker: local tensor name present exactly for quantized layers (``"qweight"``, ``"weight_packed"``, ``"SCB"``).
        encode: ``(name, layer) -> {local name: tensor}``; raises naming the layer when it cannot be held.
        config: ``({name: layer}, model) -> quantization_config`` dict.
        decode: ``(name, {local: tensor}, (out, in), quantization_config, dtype) -> layer``; must pop
            every tensor it uses from the dict (leftovers are reported as unexpected).
        detect: ``quantization_config -> bool``.
        extra_files: optional ``quantization_config -> {file name: JSON object}`` (e.g. ``quantize_config.json``).
    """

    layer_type: type
    marker: str
    encode: Callable[[str, nn.Module], dict[str, Tensor]]
    config: Callable[[dict[str, nn.Module], nn.Module], dict]
    decode: Callable[[str, dict[str, Tensor], tuple[int, int], dict, torch.dtype], nn.Module]
    detect: Callable[[dict], bool]
    extra_files: Callable[[dict], dict[str, dict]] | None = None


def hf_format(name: str, codec: LayerCodec) -> ExportFormat:
    """An :class:`ExportFormat` that writes/reads an HF directory with ``codec``."""

    def detect(config: dict) -> bool:
        qc = config.get("quantization_config")
        return isinstance(qc, dict) and codec.detect(qc)

    return ExportFormat(name=name, save=lambda m, d, o: save_hf(m, d, o, codec, name),
                        load=lambda d, c: load_hf(d, c, codec), detect=detect)


def quantized_layers(model: nn.Module, layer_type: type, fmt_name: str) -> dict[str, nn.Module]:
    """``{name: layer}`` of the model's quantized layers (every kind in :mod:`lightning_quant.layers.registry`);
    raises when there are none or some are not ``layer_type``."""
    from lightning_quant.layers.registry import quantized_layers as registered_layers

    found = registered_layers(model)
    if not found:
        raise ValueError(f"The model has no quantized layers to export as {fmt_name!r}; quantize it first "
                         "(lightning_quant.quantize_model or a PTQ/QAT callback).")
    wrong = [n for n, m in found.items() if not isinstance(m, layer_type)]
    if wrong:
        raise ValueError(f"Format {fmt_name!r} holds {layer_type.__name__} layers, but {wrong[:4]} are "
                         f"{type(found[wrong[0]]).__name__}; use format='int8' for LLM.int8 layers and "
                         "gptq/awq/compressed-tensors for packed ones.")
    return found


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating parameter (float32 when there is none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def save_hf(model: nn.Module, directory: Path, options: SaveOptions, codec: LayerCodec, fmt_name: str) -> None:
    cfg = config_dict(model, options.dtype or model_dtype(model))
    layers = quantized_layers(model, codec.layer_type, fmt_name)
    tensors: dict[str, Tensor] = {}
    for name, layer in layers.items():
        tensors.update({f"{name}.{k}": v for k, v in codec.encode(name, layer).items()})
    tensors.update(plain_tensors(model, layers, options.dtype, options.full_state))
    cfg["quantization_config"] = codec.config(layers, model)
    io.write_tensors(directory, tensors, options.max_shard_bytes)
    io.write_json(directory / "config.json", cfg)
    for fname, obj in (codec.extra_files(cfg["quantization_config"]) if codec.extra_files else {}).items():
        io.write_json(directory / fname, obj)


def config_dict(model: nn.Module, dtype: torch.dtype) -> dict:
    """The model's HF config as a dict for ``config.json``, with ``architectures`` (the model's own class when
    unset) and ``dtype`` (and ``torch_dtype`` where present) set to ``dtype``."""
    config_obj = getattr(model, "config", None)
    if config_obj is None or not hasattr(config_obj, "to_dict"):
        raise TypeError(f"Exporting needs a transformers model with a .config (got {type(model).__name__}); "
                        "wrap plain modules in a PreTrainedModel first.")
    cfg = config_obj.to_dict()
    cfg["architectures"] = cfg.get("architectures") or [_model_class(model).__name__]
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
    return cfg


def _model_class(model: nn.Module) -> type:
    """The model's own class: FSDP2's ``fully_shard`` swaps in a subclass (``FSDPLlamaForCausalLM``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return type(model)
    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def plain_tensors(model: nn.Module, layers: dict[str, nn.Module], dtype: torch.dtype | None,
                  state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Every state-dict tensor outside the quantized layers (of ``state`` when given, e.g. the gathered
    full state of an FSDP model); tied duplicates (same storage) written once."""
    prefixes = tuple(n + "." for n in layers)
    out: dict[str, Tensor] = {}
    seen: set[tuple] = set()
    for key, t in (model.state_dict(keep_vars=False) if state is None else state).items():
        if key.startswith(prefixes):
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"State entry {key!r} is a {type(t).__name__}, not a tensor; it cannot be exported.")
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            continue  # tied weight (e.g. lm_head = embed_tokens): readers re-tie from the config
        seen.add(ident)
        out[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def check_plain(name: str, layer: nn.Module, fmt_name: str, allow_act_spec: bool = False) -> None:
    """Raise when a packed layer carries an explicit input scale or activation quant the format cannot hold."""
    if getattr(layer, "input_scale", None) is not None:
        raise ValueError(f"Layer {name!r} has an explicit AWQ input_scale (its scales could not be folded into a "
                         f"preceding op, e.g. o_proj under grouped-query attention), which format {fmt_name!r} cannot "
                         "hold; export as 'onnx' (keeps the scaling), or quantize with AWQConfig(unfoldable='unscaled') "
                         "(the default), or exclude such layers from AWQ.")
    if not allow_act_spec and getattr(layer, "act_spec", None) is not None:
        raise ValueError(f"Layer {name!r} quantizes activations ({layer.act_spec}), which format {fmt_name!r} cannot "
                         "hold; export it as 'compressed-tensors' or convert with weight-only quantization.")


def take(local: dict[str, Tensor], key: str, layer: str) -> Tensor:
    """Pop ``key`` from a layer's tensors, raising ``ValueError`` that names the missing tensor."""
    if key not in local:
        raise ValueError(f"Tensor {layer + '.' + key!r} is missing from the checkpoint; the export is incomplete "
                         "or was written for another format.")
    return local.pop(key)


def build_model(config: dict) -> nn.Module:
    """An (untrained) transformers model for ``config`` (the export's ``config.json``, sans quantization)."""
    import transformers

    cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    archs = cfg.get("architectures") or []
    model_type = cfg.pop("model_type", None)
    if not archs or model_type is None:
        raise ValueError("config.json lacks 'architectures' / 'model_type'; cannot rebuild the model.")
    cls = getattr(transformers, archs[0], None)
    if cls is None:
        raise ValueError(f"transformers has no class {archs[0]!r} (from config.json 'architectures'); "
                         "upgrade transformers or fix the config.")
    hf_config = transformers.AutoConfig.for_model(model_type, **cfg)
    return cls(hf_config).eval()


def load_hf(directory: Path, config: dict, codec: LayerCodec) -> nn.Module:
    """Rebuild the model from ``config.json`` and swap in the format's quantized layers."""
    tensors = io.read_tensors(directory)
    qcfg = config["quantization_config"]
    model = build_model(config)
    dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32"))
    model.to(dtype)
    groups: dict[str, dict[str, Tensor]] = {}
    for key in [k for k in tensors if k.rsplit(".", 1)[-1] == codec.marker]:
        prefix = key.rsplit(".", 1)[0]
        groups[prefix] = {k[len(prefix) + 1:]: tensors.pop(k) for k in list(tensors)
                          if k.startswith(prefix + ".") and "." not in k[len(prefix) + 1:]}
    if not groups:
        raise ValueError(f"No quantized layer (tensor '*.{codec.marker}') in {str(directory)!r}; the file does "
                         "not match its quantization_config.")
    for prefix, local in groups.items():
        try:
            target = model.get_submodule(prefix)
        except AttributeError:
            raise ValueError(f"Checkpoint layer {prefix!r} does not exist in {config['architectures'][0]}.") from None
        out_f, in_f = linear_weight(target).shape
        layer = codec.decode(prefix, local, (out_f, in_f), qcfg, dtype)
        if local:
            raise ValueError(f"Unexpected tensors for layer {prefix!r}: {sorted(local)}.")
        set_submodule(model, prefix, layer)
    load_plain(model, tensors, set(groups))
    return model


def load_plain(model: nn.Module, tensors: dict[str, Tensor], quantized: set[str]) -> None:
    """Load ``tensors`` into ``model`` (non-strict, then re-tie tied weights), raising ``ValueError`` for an
    unexpected tensor, a wrong shape or dtype, or a missing entry outside the ``quantized`` layer prefixes."""
    state = model.state_dict()
    for key, t in tensors.items():
        if key not in state:
            raise ValueError(f"Unexpected tensor {key!r} in the checkpoint: the model has no such entry.")
        ref = state[key]
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"Tensor {key!r} has shape {tuple(t.shape)} but the model needs {tuple(ref.shape)}.")
        if t.dtype != ref.dtype and not (t.is_floating_point() and ref.is_floating_point()):
            raise ValueError(f"Tensor {key!r} has dtype {t.dtype} but the model needs {ref.dtype}.")
    missing, _ = model.load_state_dict(tensors, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    loaded = {_storage(t) for k, t in model.state_dict().items() if k in tensors}
    prefixes = tuple(q + "." for q in quantized)
    state = model.state_dict()
    really_missing = [k for k in missing if not k.startswith(prefixes) and _storage(state[k]) not in loaded]
    if really_missing:
        raise ValueError(f"Tensors missing from the checkpoint: {really_missing[:6]}; the export is incomplete.")


def _storage(t: Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
