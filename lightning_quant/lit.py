"""A ready-made LightningModule and DataModule for causal LMs on real offline text.

Used by the LightningCLI recipes (``callbacks/*.yaml``), the examples and ``make demo``; also a
starting point for users. Everything is configurable from YAML (plain typed arguments).

* :class:`CausalLM` — ``model`` is ``"smollm2"`` (embedded SmolLM2-135M), ``"tiny-llama"`` /
  ``"tiny-gpt2"`` / ``"tiny-opt"`` (random tiny models for smoke runs), a local HF directory or a
  ``.gguf`` file; optional peft LoRA (``lora_r > 0``).
* :class:`StdlibText` — Python standard-library sources (present on every machine), held-out files
  for validation; tokenized with the model's tokenizer, or as bytes for the tiny models.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_quant import testing
from lightning_quant.data import stdlib_text, token_windows
from lightning_quant.models import load_causal_lm, load_tokenizer

__all__ = ["DEFAULT_LORA_TARGETS", "TINY_MODELS", "CausalLM", "StdlibText", "byte_text_loaders", "make_lightning_module"]

#: random tiny models for smoke runs; hidden 256 so that the recipes' group size 128 applies
TINY_MODELS = {
    "tiny-llama": lambda: testing.tiny_llama(hidden=256),
    "tiny-gpt2": lambda: testing.tiny_gpt2(hidden=256),
    "tiny-opt": lambda: testing.tiny_opt(hidden=256),
}
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_model(name: str) -> nn.Module:
    if name in TINY_MODELS:
        return TINY_MODELS[name]()
    return load_causal_lm(name)


def with_lora(model: nn.Module, r: int, alpha: int, targets: list[str] | None) -> nn.Module:
    """``model`` wrapped by peft LoRA (rank ``r``) on ``targets``; unchanged when ``r == 0``."""
    if not r:
        return model
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets or DEFAULT_LORA_TARGETS), lora_dropout=0.0)
    return get_peft_model(model, cfg)


class CausalLM(pl.LightningModule):
    """Next-token cross-entropy training of a causal LM on ``[B, T]`` token-id batches.

    Args:
        model: ``"smollm2"``, ``"tiny-llama"``, ``"tiny-gpt2"``, ``"tiny-opt"``, an HF directory or a ``.gguf`` file,
            or an already-built ``nn.Module`` (not saved in the hyperparameters).
        lr: AdamW learning rate.
        lora_r: LoRA rank (0 = full fine-tuning); adapters go on ``lora_targets`` via peft.
        lora_alpha: LoRA scaling numerator.
        lora_targets: module-name suffixes that receive adapters.
    """

    def __init__(self, model: str | nn.Module = "smollm2", lr: float = 1e-4, lora_r: int = 0, lora_alpha: int = 16,
                 lora_targets: list[str] | None = None) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}.")
        if lora_r < 0:
            raise ValueError(f"lora_r must be >= 0 (0 disables LoRA), got {lora_r}.")
        built = isinstance(model, nn.Module)
        self.save_hyperparameters(ignore=["model"] if built else None)
        self.model = with_lora(model if built else build_model(model), lora_r, lora_alpha, lora_targets)
        self.lr = lr

    @classmethod
    def from_model(cls, model: nn.Module, lr: float = 1e-3, lora_r: int = 0, lora_alpha: int = 16,
                   lora_targets: list[str] | None = None) -> CausalLM:
        """Wrap an already-built model (tests, scripts), optionally adding LoRA adapters: ``CausalLM(model, ...)``
        with the scripts' default learning rate."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"CausalLM.from_model takes an nn.Module, got {type(model).__name__}; "
                            "pass a model name to CausalLM(model=...) instead.")
        return cls(model, lr=lr, lora_r=lora_r, lora_alpha=lora_alpha, lora_targets=lora_targets)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        logits = self(batch)[:, :-1]
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch), prog_bar=True)

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class StdlibText(pl.LightningDataModule):
    """Windows of standard-library source code; validation uses held-out files.

    Args:
        tokenizer: ``"bytes"`` (byte ids, vocab 256, for the tiny models) or a model spec for
            :func:`~lightning_quant.models.load_tokenizer` (``"smollm2"``, an HF dir, a ``.gguf``).
        seq_len: tokens per window.
        batch_size: windows per batch.
        train_windows / val_windows: how many windows of each split.
    """

    def __init__(self, tokenizer: str = "smollm2", seq_len: int = 256, batch_size: int = 4,
                 train_windows: int = 64, val_windows: int = 8) -> None:
        super().__init__()
        for k, v in {"seq_len": seq_len, "batch_size": batch_size, "train_windows": train_windows, "val_windows": val_windows}.items():
            if v < 1:
                raise ValueError(f"{k} must be >= 1, got {v}.")
        self.tokenizer, self.seq_len, self.batch_size = tokenizer, seq_len, batch_size
        self.train_windows, self.val_windows = train_windows, val_windows
        self.train_ids = self.val_ids = None

    def _encode(self, text: str) -> torch.Tensor:
        if self.tokenizer == "bytes":
            return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        tok = load_tokenizer(self.tokenizer)
        return tok(text, return_tensors="pt").input_ids[0]

    def setup(self, stage: str | None = None) -> None:
        if self.train_ids is not None:
            return
        chars = 8 * self.seq_len  # generous: >= 1 token per 4 chars on code for BPE, 1 per char for bytes
        self.train_ids = token_windows(self._encode(stdlib_text(chars * self.train_windows, "train")), self.seq_len, self.train_windows)
        self.val_ids = token_windows(self._encode(stdlib_text(chars * self.val_windows, "heldout")), self.seq_len, self.val_windows)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.train_ids, batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.val_ids, batch_size=self.batch_size)

    def test_dataloader(self):
        return self.val_dataloader()


def make_lightning_module(model: nn.Module, lr: float = 1e-3):
    """A ``LightningModule`` around an HF causal LM (next-token loss on id batches)."""
    return CausalLM.from_model(model, lr)


def byte_text_loaders(seq_len: int = 64, n_train: int = 16, n_val: int = 4, batch_size: int = 4):
    """Train/val DataLoaders of real standard-library source as byte tokens (deterministic)."""
    dm = StdlibText("bytes", seq_len, batch_size, n_train, n_val)
    dm.setup()
    return dm.train_dataloader(), dm.val_dataloader()
