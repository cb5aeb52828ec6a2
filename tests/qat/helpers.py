"""Shared pieces of the QAT tests: a tiny causal-LM LightningModule and deterministic data."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import qat, testing


class TinyCausalLM(pl.LightningModule):
    """Next-token loss on a tiny Llama; SGD keeps the optimizer state small and deterministic."""

    def __init__(self, model: torch.nn.Module | None = None, lr: float = 0.05) -> None:
        super().__init__()
        self.model = model if model is not None else testing.tiny_llama()
        self.model.train()  # Lightning 2.6 keeps the modes it finds; observers update in training mode only
        self.lr = lr
        self.losses: list[float] = []
        self.enabled_log: list[bool] = []  # fake quant on/off as seen by each training step

    def forward(self, ids):
        return self.model(input_ids=ids).logits

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        logits = self(ids)[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        self.losses.append(loss.item())
        fqs = list(qat.fake_quant_modules(self).values())
        if fqs:
            self.enabled_log.append(all(bool(fq.enabled) for fq in fqs))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr, momentum=0.9)


def token_loader(n: int = 8, seq_len: int = 24, batch_size: int = 2, seed: int = 0, vocab: int = 256) -> DataLoader:
    """A fixed, learnable stream: repeated short patterns, so a few steps visibly reduce the loss."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, vocab, (n, 6), generator=g)
    ids = base.repeat(1, seq_len // 6 + 1)[:, :seq_len]  # [n, seq_len]
    return DataLoader(TensorDataset(ids), batch_size=batch_size, shuffle=False)


def trainer(max_steps: int, **kwargs) -> pl.Trainer:
    defaults = {"accelerator": "cpu", "devices": 1, "max_steps": max_steps, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "deterministic": True, "num_sanity_val_steps": 0}
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def ddp_worker(rank: int, port: int, out_dir: str, steps: int) -> None:
    """One rank of a 2-process gloo DDP QAT run (the precision plugin injects before DDP wrapping)."""
    import os

    from lightning_quant.plugins import QuantizationPrecision
    from lightning_quant.spec import ActivationSpec, QuantSpec

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    lm = TinyCausalLM()
    plugin = QuantizationPrecision(QuantSpec(4, 32), ActivationSpec(), observer="lsq")
    t = trainer(steps, strategy="ddp", devices=2, plugins=[plugin])
    t.fit(lm, token_loader(n=8))
    torch.save({"state": lm.state_dict(), "n_fq": len(qat.fake_quant_modules(lm)), "losses": lm.losses},
               os.path.join(out_dir, f"rank{rank}.pt"))
