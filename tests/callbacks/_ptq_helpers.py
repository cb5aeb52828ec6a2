"""A tiny LightningModule / DataModule / Trainer for the PTQ callback tests (AWQ, LLM.int8)."""

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_quant import testing


class LM(pl.LightningModule):
    def __init__(self, arch: str = "llama"):
        super().__init__()
        self.model = {"llama": testing.tiny_llama, "gpt2": testing.tiny_gpt2, "opt": testing.tiny_opt}[arch]()

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class DM(pl.LightningDataModule):
    def __init__(self, n=8):
        super().__init__()
        ids = torch.randint(0, testing.TINY_VOCAB, (n, 17), generator=torch.Generator().manual_seed(0))
        self.ds = TensorDataset(ids[:, :-1], ids[:, 1:])

    def train_dataloader(self):
        return DataLoader(self.ds, batch_size=2)


def trainer(tmp_path, cb, **kw):
    from lightning.pytorch.loggers import CSVLogger

    return pl.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path), callbacks=[cb],
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kw)


def logged_keys(trainer_):
    import csv

    with open(trainer_.logger.log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {k for r in rows for k, v in r.items() if v}
