"""Tiny transformers models built from configs (no downloads), for tests, docs and smoke runs.

Sizes are chosen so that group-wise quantization is exercised on non-multiple shapes:
hidden 96 (= 1.5 x 64), intermediate 160.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["tiny_llama", "tiny_gpt2", "tiny_opt", "TINY_VOCAB", "random_token_batches", "byte_windows",
           "make_lightning_module", "byte_text_loaders"]

TINY_VOCAB = 256


def tiny_llama(seed: int = 0, hidden: int = 96, layers: int = 2) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=hidden, intermediate_size=160, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


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


def byte_windows(text: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Real text as byte-level token ids (vocab 256, matches the tiny models) in ``[N, seq_len]`` windows."""
    from lightning_quant.data import token_windows

    ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    return token_windows(ids, seq_len, max_windows)


def make_lightning_module(model: nn.Module, lr: float = 1e-3):
    """A minimal ``LightningModule`` around an HF causal LM: next-token loss on id batches."""
    import lightning.pytorch as pl

    class _LM(pl.LightningModule):
        def __init__(self, model: nn.Module, lr: float) -> None:
            super().__init__()
            self.model = model
            self.lr = lr

        def forward(self, input_ids: torch.Tensor):
            return self.model(input_ids=input_ids).logits

        def _loss(self, batch: torch.Tensor) -> torch.Tensor:
            logits = self(batch)[:, :-1]
            return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

        def training_step(self, batch, batch_idx):
            loss = self._loss(batch)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", self._loss(batch))

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    return _LM(model, lr)


def byte_text_loaders(seq_len: int = 64, n_train: int = 16, n_val: int = 4, batch_size: int = 4):
    """Train/val DataLoaders of real standard-library source as byte tokens (deterministic)."""
    from lightning_quant.data import stdlib_text

    train = byte_windows(stdlib_text(200_000, "train"), seq_len, n_train)
    val = byte_windows(stdlib_text(100_000, "heldout"), seq_len, n_val)
    dl = torch.utils.data.DataLoader
    return dl(train, batch_size=batch_size, shuffle=False), dl(val, batch_size=batch_size)
