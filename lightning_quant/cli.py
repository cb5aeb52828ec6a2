"""``lightning-quant``: standalone PTQ of a saved model, and held-out perplexity.

    lightning-quant quantize --model DIR --method {rtn,gptq,...} [--bits 4] [--group-size 128] [--sym | --asym]
                             [--act-order | --no-act-order] [--gptaq] [--rotate {hadamard,random} [--rotate-seed 0]]
                             --calib FILE --num-samples 128 --seq-len 512 --out DIR
                             [--format {lightning-quant,gptq,gptq_v2,awq,compressed-tensors,gguf,int8,onnx}]
                             [--export-option KEY=VALUE ...]   # the format's options, e.g. accuracy_level=4 (onnx), float_type=q8_0 (gguf)
    lightning-quant quantize --model DIR --method int8 --out DIR    # the spec is fixed: W8 per channel
    lightning-quant eval --model DIR --data FILE --seq-len 512 [--max-windows N]   # last line: ppl=<value>

``--model`` is an HF model directory, a ``.gguf`` file, ``smollm2`` (the embedded model), or (for
``eval``) a directory written by ``quantize``. ``--method`` choices come from the method registry.

The weight spec flags default to :class:`~lightning_quant.spec.QuantSpec`'s own defaults (4 bits,
group size 128, symmetric, float16 scales): ``--asym`` stores a zero point per group. A method with a
fixed spec (``int8``: ``INT8_METHOD_SPEC``, 8 bits, per channel, symmetric, float32 scales) takes it when
no spec flag is given; a spec flag that contradicts it is an error, not ignored.

Output of ``quantize`` (readable by ``eval``): by default the ``lightning-quant`` format
(:mod:`lightning_quant.export.native`; safetensors + JSON only): ``config.json`` (HF config), tokenizer
files, ``quantization.json`` (``format``, ``version`` 2, ``method``, ``spec``, ``dtype`` and per layer the
layer registry's config — kind, shapes, spec, act order, activation spec, input scale or LLM.int8
threshold — plus the method's float figures) and ``model.safetensors`` (all weights; quantized layers as
their own buffers). It is one of the export formats: ``quantize`` writes every ``--format`` with
:func:`lightning_quant.export.save` (``docs/formats.md``), and ``eval`` reads every one (version-1
``lightning-quant`` directories included) with :func:`lightning_quant.export.load`.
``--export-option KEY=VALUE`` (repeatable) sets one of the format's options (``onnx``: ``graph``,
``accuracy_level``, ``context_length`` of :class:`~lightning_quant.export.onnx.OnnxOptions`; ``gguf``:
``float_type=q8_0``, ``pre_tokenizer=smollm`` of :class:`~lightning_quant.export.gguf.GGUFOptions`); values
read as int when they are digits, ``true``/``false`` as bool, ``none`` as None, else as text.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from torch import nn

__all__ = ["build_parser", "evaluate", "load_quantized", "main", "quantize", "save_quantized"]

#: the default --format (lightning_quant.export.native); its options (method, figures) are filled by quantize
FORMAT = "lightning-quant"


def _method_names() -> list[str]:
    from lightning_quant.methods.registry import METHODS, _load_builtin_methods

    _load_builtin_methods()
    return sorted(METHODS)


def _fixed_specs() -> dict[str, str]:
    from lightning_quant.methods.registry import METHODS, _load_builtin_methods

    _load_builtin_methods()
    return {n: str(m.fixed_spec) for n, m in sorted(METHODS.items()) if m.fixed_spec is not None}


def _export_formats() -> list[str]:
    from lightning_quant.export import available_formats

    return available_formats()


def build_parser() -> argparse.ArgumentParser:
    from lightning_quant.spec import ALLOWED_BITS, QuantSpec

    d = QuantSpec()
    p = argparse.ArgumentParser(prog="lightning-quant", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a model and save it")
    q.add_argument("--model", required=True, help="HF model directory, .gguf file, or 'smollm2'")
    fixed = ", ".join(f"{n} ({s})" for n, s in _fixed_specs().items())
    q.add_argument("--method", required=True, choices=_method_names(),
                   help=f"fixed spec, no spec flags needed: {fixed}" if fixed else None)
    # spec flags default to None ("not given"): QuantSpec's defaults fill them, or the method's fixed spec
    q.add_argument("--bits", type=int, default=None, choices=ALLOWED_BITS, help=f"code width (default {d.bits})")
    q.add_argument("--group-size", type=int, default=None,
                   help=f"input features per scale, -1 for per output channel (default {d.group_size})")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_const", const=True, default=None,
                     help="symmetric codes, implicit zero point" + (" (default)" if d.symmetric else ""))
    sym.add_argument("--asym", dest="sym", action="store_const", const=False,
                     help="asymmetric codes with a zero point per group" + ("" if d.symmetric else " (default)"))
    q.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="process columns by descending Hessian diagonal, with static groups (gptq, awq+gptq; "
                        "default on: GPTQConfig's default); --no-act-order turns it off")
    q.add_argument("--gptaq", action="store_const", const=True, default=None,
                   help="experimental: GPTAQ, fit the float model's layer outputs from the quantized model's inputs "
                        "(GPTQConfig(gptaq=True); gptq, awq+gptq)")
    q.add_argument("--qparam-search", choices=("none", "weight", "hessian"), default=None,
                   help="grid-search each group's clip range (QParamSearch) minimising the weight error "
                        "(rtn, gptq, awq+gptq) or the Hessian-weighted error (gptq, awq+gptq; gptq's default), "
                        "or 'none' for min-max qparams")
    q.add_argument("--rotate", choices=("hadamard", "random"), default=None,
                   help="rotate the residual stream offline before quantizing (QuaRot / SpinQuant R1; Rotation(kind=...)): "
                        "a randomised Hadamard, or a random orthogonal matrix for hidden sizes no Hadamard covers "
                        "(rtn, gptq, awq, awq+gptq)")
    q.add_argument("--rotate-seed", type=int, default=0, help="seed of the rotation's random signs / matrix (default 0)")
    q.add_argument("--calib", help="calibration text file (methods that need calibration)")
    q.add_argument("--num-samples", type=int, default=128, help="calibration sequences")
    q.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--format", default=FORMAT, choices=_export_formats(),
                   help=f"on-disk format (default {FORMAT}; others: see docs/formats.md)")
    q.add_argument("--export-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of --format (repeatable), e.g. accuracy_level=4 for onnx, float_type=q8_0 for gguf")
    e = sub.add_parser("eval", help="perplexity on non-overlapping windows of a text file")
    e.add_argument("--model", required=True, help="directory written by 'quantize', HF directory, .gguf or 'smollm2'")
    e.add_argument("--data", required=True, help="text file")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--max-windows", type=int, default=None)
    return p


def _positive(name: str, v: int | None) -> None:
    if v is not None and v < 1:
        raise SystemExit(f"error: --{name} must be a positive integer, got {v}.")


def _windows(tokenizer, path: str, seq_len: int, n: int | None):
    from lightning_quant.data import token_windows

    text = Path(path).read_text(encoding="utf-8")
    ids = tokenizer(text, return_tensors="pt").input_ids
    windows = token_windows(ids, seq_len, n)
    if n is not None and windows.shape[0] < n:
        raise SystemExit(f"error: {path} holds only {windows.shape[0]} window(s) of {seq_len} tokens, fewer than "
                         f"{n}; give more text, or lower --num-samples / --seq-len.")
    return windows


def _method_config(method, act_order: bool | None, qparam_search: str | None = None, gptaq: bool | None = None):
    """The method's config from the method flags; a flag the method's config lacks exits naming it."""
    from lightning_quant.spec import QParamSearch

    fields = set() if method.config_type is None else {f.name for f in dataclasses.fields(method.config_type)}
    opts = {}
    for flag, field, value in (("--act-order", "act_order", act_order),
                               ("--qparam-search", "qparam_search", qparam_search), ("--gptaq", "gptaq", gptaq)):
        if value is not None and field not in fields:
            raise SystemExit(f"error: {flag} is not an option of --method {method.name}.")
        if value == "none":
            opts[field] = None
        elif value is not None:
            opts[field] = QParamSearch(objective=value) if field == "qparam_search" else value
    if not opts:
        return None
    try:
        return method.config_type(**opts)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


#: the spec flags' argparse names -> the QuantSpec fields they set
_SPEC_ARGS = {"bits": "bits", "group_size": "group_size", "sym": "symmetric"}


def _flag(arg: str, value) -> str:
    """How the user spells ``arg=value`` on the command line (``--bits 4``, ``--asym``)."""
    if arg == "sym":
        return "--sym" if value else "--asym"
    return f"--{arg.replace('_', '-')} {value}"


def _spec(args: argparse.Namespace, method):
    """The weight spec: the flags given over QuantSpec's defaults, or the method's fixed spec (flags must agree)."""
    from lightning_quant.spec import QuantSpec

    given = {arg: getattr(args, arg) for arg in _SPEC_ARGS if getattr(args, arg) is not None}
    fixed = method.fixed_spec
    if fixed is not None:
        wrong = [arg for arg, v in given.items() if v != getattr(fixed, _SPEC_ARGS[arg])]
        if wrong:
            needed = " ".join(_flag(arg, getattr(fixed, field)) for arg, field in _SPEC_ARGS.items())
            raise SystemExit(f"error: --method {method.name} always quantizes to {fixed} ({needed}); drop "
                             f"{' '.join(_flag(arg, given[arg]) for arg in wrong)}, or omit the spec flags.")
        return fixed
    try:
        return QuantSpec(**{_SPEC_ARGS[arg]: v for arg, v in given.items()})
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}") from None


def _option_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    return int(text) if text.lstrip("-").isdigit() else text


def _export_options(args: argparse.Namespace) -> dict | None:
    """``--export-option KEY=VALUE`` flags as a dict (None when none are given)."""
    items = getattr(args, "export_option", None) or []
    if items and args.format == FORMAT:
        others = [f for f in _export_formats() if f != FORMAT]
        raise SystemExit(f"error: --export-option needs --format (one of {others}); {FORMAT} takes no command-line "
                         "options (quantize records the method and its figures itself).")
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --export-option takes KEY=VALUE, got {item!r}.")
        out[key.strip().replace("-", "_")] = _option_value(value.strip())
    return out or None


def quantize(args: argparse.Namespace) -> Path:
    """The ``quantize`` subcommand: load, calibrate, quantize, save; returns the output directory."""
    from lightning_quant.api import quantize_model
    from lightning_quant.methods.registry import get_method
    from lightning_quant.models import load_causal_lm, load_tokenizer

    _positive("num-samples", args.num_samples)
    _positive("seq-len", args.seq_len)
    method = get_method(args.method)
    spec = _spec(args, method)
    export_options = _export_options(args)
    if export_options is not None:
        from lightning_quant.export.registry import format_options, get_format

        try:
            format_options(get_format(args.format), export_options)  # fail before quantizing, not after
        except (ValueError, TypeError) as e:
            raise SystemExit(f"error: --export-option: {e}") from None
    config = _method_config(method, args.act_order, args.qparam_search, args.gptaq)
    rotation = None
    if getattr(args, "rotate", None) is not None:
        from lightning_quant.api import check_rotation
        from lightning_quant.methods.rotation import Rotation

        try:
            rotation = Rotation(kind=args.rotate, seed=args.rotate_seed)
            check_rotation(method, rotation)  # before the model loads
        except ValueError as e:
            raise SystemExit(f"error: --rotate: {e}") from None
    elif getattr(args, "rotate_seed", 0):
        raise SystemExit("error: --rotate-seed needs --rotate {hadamard,random}.")
    model, tokenizer = load_causal_lm(args.model), load_tokenizer(args.model)
    calib = None
    if method.needs_calibration:
        if not args.calib:
            raise SystemExit(f"error: --method {args.method} needs --calib FILE (a text file).")
        calib = _windows(tokenizer, args.calib, args.seq_len, args.num_samples)
    elif args.calib:
        print(f"note: --method {args.method} uses no calibration data; --calib ignored.", file=sys.stderr)
    weights = quantize_model(model, spec, args.method, calibration=calib, config=config, rotation=rotation)
    if args.format == FORMAT:
        export_options = {"method": args.method, "figures": weights.float_figures()}
    from lightning_quant import export

    try:
        out = export.save(model, args.out, args.format, tokenizer=tokenizer, overwrite=True, options=export_options)
    except ValueError as e:
        raise SystemExit(f"error: --format {args.format}: {e}") from None
    print(f"quantized {len(weights)} layers with {args.method} ({spec}) -> {out}")
    return out


def save_quantized(model: nn.Module, method: str, out: str | Path, tokenizer=None,
                   figures: dict[str, dict[str, float]] | None = None) -> Path:
    """Write ``model`` (quantized layers swapped in) in the ``lightning-quant`` format, replacing ``out``.

    ``figures`` is ``{layer name: {figure: float}}`` (e.g. ``gptq_loss``), recorded per layer. The same as
    ``export.save(model, out, "lightning-quant", tokenizer=tokenizer, overwrite=True,
    options=NativeOptions(method, figures))``.
    """
    from lightning_quant import export
    from lightning_quant.export.native import NativeOptions

    return export.save(model, out, FORMAT, tokenizer=tokenizer, overwrite=True,
                       options=NativeOptions(method=method, figures=figures or {}))


def load_quantized(directory: str | Path) -> nn.Module:
    """Read a directory written by :func:`save_quantized` (``lightning-quant`` version 1 or 2; any other export
    format too): :func:`lightning_quant.export.load`, in eval mode."""
    from lightning_quant import export

    return export.load(directory).eval()


def _is_export(path: str) -> bool:
    """A directory :func:`lightning_quant.export.load` reads: ``config.json`` marks an export (gptq, awq,
    compressed-tensors, int8, onnx, gguf, lightning-quant), or a format's marker file is there
    (``quantization.json``: lightning-quant version 1)."""
    from lightning_quant.export.io import read_json
    from lightning_quant.export.registry import detect_format

    directory = Path(path)
    if not (directory / "config.json").is_file():
        return False
    config = read_json(directory / "config.json")
    if "quantization_config" in config or "lightning_quant_export" in config:
        return True
    try:
        detect_format(config, directory)
    except ValueError:
        return False
    return True


def evaluate(args: argparse.Namespace) -> float:
    """The ``eval`` subcommand: perplexity on non-overlapping ``--seq-len`` windows; prints ``ppl=<value>``."""
    from lightning_quant.evaluation import perplexity
    from lightning_quant.models import load_causal_lm, load_tokenizer

    _positive("seq-len", args.seq_len)
    _positive("max-windows", args.max_windows)
    if _is_export(args.model):
        from lightning_quant import export

        model = export.load(args.model)
    else:
        model = load_causal_lm(args.model)
    windows = _windows(load_tokenizer(args.model), args.data, args.seq_len, None)
    if args.max_windows is not None:
        windows = windows[: args.max_windows]
    ppl = perplexity(model, windows)
    print(f"windows={windows.shape[0]} seq_len={args.seq_len}")
    print(f"ppl={ppl:.4f}")
    return ppl


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    {"quantize": quantize, "eval": evaluate}[args.command](args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
