"""Tiny transformers models built from configs (no downloads), for tests, docs and smoke runs.

Sizes are chosen so that group-wise quantization is exercised on non-multiple shapes:
hidden 96 (= 1.5 x 64), intermediate 160.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "TINY_VOCAB",
    "bpe_tokenizer",
    "byte_tokenizer",
    "random_token_batches",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_opt",
    "tiny_qwen2",
]

TINY_VOCAB = 256


def tiny_llama(seed: int = 0, hidden: int = 96, layers: int = 2, head_dim: int | None = None,
               vocab: int = TINY_VOCAB, tie_word_embeddings: bool = False) -> nn.Module:
    """4 query heads over 2 key/value heads (grouped-query); ``head_dim`` defaults to ``hidden / 4``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=160, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      head_dim=head_dim or hidden // 4, tie_word_embeddings=tie_word_embeddings)
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(seed: int = 0, hidden: int = 96, layers: int = 2, tie_word_embeddings: bool = True) -> nn.Module:
    """Qwen2 (biases on q/k/v, grouped-query 4 over 2 heads), tied embeddings by default as Qwen2-0.5B."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=TINY_VOCAB, hidden_size=hidden, intermediate_size=160, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie_word_embeddings)
    return Qwen2ForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0, hidden: int = 96, layers: int = 2) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=TINY_VOCAB, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_opt(seed: int = 0, hidden: int = 96, layers: int = 2) -> nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=TINY_VOCAB, hidden_size=hidden, ffn_dim=160, num_hidden_layers=layers,
                    num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=hidden,
                    bos_token_id=0, eos_token_id=0, pad_token_id=1)
    return OPTForCausalLM(cfg).eval()


def random_token_batches(n: int = 4, seq_len: int = 32, batch_size: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY_VOCAB, (batch_size, seq_len), generator=g) for _ in range(n)]


def byte_tokenizer():
    """A transformers fast tokenizer over the 256 byte-level symbols (matches the tiny models' vocab); it
    decodes back to the text (byte-level decoder), as onnxruntime-genai's tokenizer does from ``tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def bpe_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on standard-library source (deterministic; real merges, an
    ``<|endoftext|>`` special token as bos/eos), for exports that embed the vocabulary (GGUF)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lightning_quant.data import stdlib_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator([stdlib_text(20_000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
