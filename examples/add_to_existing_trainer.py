"""A plain Lightning fine-tuning script. Quantization is exactly one added line (marked below).

    python examples/add_to_existing_trainer.py                 # SmolLM2-135M, a few steps on CPU
    python examples/add_to_existing_trainer.py --model tiny-llama --steps 2   # smoke run

Everything except the marked line is what you already have: your LightningModule, your data,
your Trainer. The callback injects fake quant at setup, trains under it, and at the end swaps
in packed 4-bit layers built from what was trained.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_quant.callbacks import QuantizationAwareTraining
from lightning_quant.lit import StdlibText, build_model
from lightning_quant.spec import QuantSpec


class MyLM(pl.LightningModule):
    """Your own module: any causal LM, next-token loss."""

    def __init__(self, model: nn.Module, lr: float = 5e-5) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch, batch_idx):
        logits = self.model(input_ids=batch).logits[:, :-1]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self.model(input_ids=batch).logits[:, :-1]
        self.log("val_loss", nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main(argv: list[str] | None = None) -> pl.Trainer:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default="runs/add_to_existing_trainer")
    args = ap.parse_args(argv)

    data = StdlibText("bytes" if args.model.startswith("tiny") else args.model, seq_len=128, batch_size=2,
                      train_windows=2 * args.steps, val_windows=2)
    data.setup()
    trainer = pl.Trainer(
        max_steps=args.steps,
        default_root_dir=args.out,
        limit_val_batches=1,
        callbacks=[QuantizationAwareTraining(QuantSpec(bits=4, group_size=64))],  # <- the one added line
    )
    trainer.fit(MyLM(build_model(args.model)), DataLoader(data.train_ids, batch_size=2), DataLoader(data.val_ids, batch_size=2))
    return trainer


if __name__ == "__main__":
    main()
