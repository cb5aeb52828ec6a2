"""A transformers tokenizer as GGUF ``tokenizer.ggml.*`` metadata (byte-level BPE, llama.cpp's ``"gpt2"`` model).

Written from the fast tokenizer's own ``tokenizer.json``: ``tokens`` (by id), ``token_type`` (1 normal,
3 control for special added tokens, 4 user-defined for other added tokens, 5 unused for the padding
rows an embedding larger than the vocabulary has: ``[PAD<id>]``), ``merges`` (``"a b"``), the special ids
(``bos`` / ``eos`` / ``unknown`` / ``padding``; from the tokenizer, else the model config),
``add_bos_token``, ``pre`` (:attr:`GGUFOptions.pre_tokenizer`) and ``chat_template``.

SentencePiece / WordPiece tokenizers raise (llama.cpp's ``"llama"`` model needs the scores of the
SentencePiece model, which a fast tokenizer does not keep).
"""

from __future__ import annotations

import json
import warnings
from typing import Any

__all__ = ["write_vocab"]

_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


def _backend(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"GGUF export needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}; "
                         "load it with AutoTokenizer.from_pretrained(..., use_fast=True).")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    byte_level = "ByteLevel" in json.dumps(spec.get("decoder")) or "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or not byte_level:
        raise ValueError(f"GGUF export writes byte-level BPE tokenizers (llama.cpp 'gpt2': SmolLM2, Llama 3, GPT-2, "
                         f"Qwen); this one is {model.get('type')!r} (byte-level: {byte_level}).")
    return model


def _merges(model: dict) -> list[str]:
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if not merges:
        raise ValueError("The tokenizer has no BPE merges; llama.cpp refuses a 'gpt2' vocabulary without "
                         "tokenizer.ggml.merges. Export with the model's real (trained) tokenizer.")
    return merges


def _tokens(tokenizer: Any, n_vocab: int) -> tuple[list[str], list[int]]:
    vocab = tokenizer.get_vocab()  # token -> id, added tokens included
    n = len(vocab)
    if n > n_vocab:
        raise ValueError(f"The tokenizer has {n} tokens but the model's embedding only {n_vocab} rows; pass the "
                         "model's own tokenizer.")
    tokens: list[str | None] = [None] * n
    for tok, i in vocab.items():
        if not 0 <= i < n or tokens[i] is not None:
            raise ValueError(f"The tokenizer's ids are not 0..{n - 1} without gaps (id {i} of {tok!r}); GGUF lists "
                             "tokens by id.")
        tokens[i] = tok
    types = [_NORMAL] * n
    for i, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if i < n:
            types[i] = _CONTROL if getattr(added, "special", False) else _USER_DEFINED
    pad = [f"[PAD{i}]" for i in range(n, n_vocab)]
    return tokens + pad, types + [_UNUSED] * len(pad)


def _special_id(tokenizer: Any, config: Any, which: str) -> int | None:
    v = getattr(tokenizer, f"{which}_token_id", None)
    if v is None and which in ("bos", "eos", "pad"):
        v = getattr(config, f"{which}_token_id", None)
    if isinstance(v, list):  # configs may list several eos ids; llama.cpp takes one
        v = v[0] if v else None
    return None if v is None else int(v)


def write_vocab(writer: Any, tokenizer: Any, n_vocab: int, config: Any, pre_tokenizer: str | None) -> None:
    """Add the ``tokenizer.ggml.*`` keys for ``tokenizer`` to a ``gguf.GGUFWriter``."""
    model = _backend(tokenizer)
    merges = _merges(model)
    tokens, types = _tokens(tokenizer, n_vocab)
    if pre_tokenizer is None:
        warnings.warn("GGUF export: no pre_tokenizer given, writing tokenizer.ggml.pre='default' (llama.cpp then "
                      "splits text with its default regex, which may differ from this tokenizer's); pass "
                      "options={'pre_tokenizer': NAME} with llama.cpp's name for it ('smollm' for SmolLM2, "
                      "'llama-bpe' for Llama 3, ...).", UserWarning, stacklevel=4)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer or "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for which, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                       ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        v = _special_id(tokenizer, config, which)
        if v is not None:
            if not 0 <= v < n_vocab:
                raise ValueError(f"The {which} token id {v} is outside the vocabulary [0, {n_vocab}).")
            add(v)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
