"""The composition matrix: every callback setup in every script style users write.

A *style* is how an ordinary fine-tuning script looks (a LightningModule with or without ``forward``,
tensor or dict batches with padding and labels, peft LoRA, a precision, GPT-2, gradient accumulation
with validation, resume from a checkpoint, DDP). A *setup* is the list of lightning-quant callbacks
added to it — one line in the user's script. :func:`run_cell` runs one (style, setup) pair through a
real ``Trainer.fit`` and returns what the assertions need; nothing here knows the library's internals
beyond its public callbacks and ``export.load``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_quant import QuantSpec, export, testing
from lightning_quant.callbacks import (
    AWQ,
    GPTQ,
    LLMInt8,
    PackedValidation,
    QuantizationAwareTraining,
    QuantizationReport,
)

SPEC = QuantSpec(bits=4, group_size=32)
PAD = 0
SEQ = 20


# ---- data: what tokenizers + collators hand a Trainer ------------------------------------------
class PaddedText(Dataset):
    """Variable-length rows of a learnable pattern, right-padded by the collator (HF style)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for _ in range(n):
            length = int(torch.randint(SEQ // 2, SEQ + 1, (), generator=g))
            base = torch.randint(1, testing.TINY_VOCAB, (5,), generator=g)
            self.rows.append(base.repeat(SEQ // 5 + 1)[:length])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.rows[i]


def collate_dict(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask`` / ``labels`` (−100 at padding), like DataCollatorForLanguageModeling."""
    ids = torch.full((len(rows), SEQ), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), SEQ), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_tensor(rows: list[torch.Tensor]) -> torch.Tensor:
    """Plain ``[B, T]`` token ids (rows cut to the shortest), the tensor-batch style."""
    n = min(len(r) for r in rows)
    return torch.stack([r[:n] for r in rows])


def loaders(style: str, n_train: int = 4, n_val: int = 2, batch_size: int = 2):
    collate = collate_tensor if style == "forward" else collate_dict
    train = DataLoader(PaddedText(n_train, 0), batch_size=batch_size, collate_fn=collate)
    val = DataLoader(PaddedText(n_val, 1), batch_size=batch_size, collate_fn=collate)
    return train, val


# ---- LightningModules as users write them -------------------------------------------------------
class ForwardLM(pl.LightningModule):
    """The project's own style: ``forward(input_ids)`` and tensor batches."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def _loss(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self(ids)[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


class HFLM(pl.LightningModule):
    """The common style: the HF model at ``self.model``, *no* ``forward``, dict batches with labels."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(**batch).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


class ForwardDictLM(HFLM):
    """A ``forward`` that takes the whole dict batch (``self(batch)`` in the steps)."""

    def forward(self, batch: dict):
        return self.model(**batch)

    def training_step(self, batch, batch_idx):
        return self(batch).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self(batch).loss)


@dataclass(frozen=True)
class Style:
    name: str
    arch: str = "llama"
    module: type = HFLM
    peft: bool = False
    trainer: dict = field(default_factory=dict)
    resume: bool = False
    lora: str = "merged"  # PTQ / QAT lora= option (peft styles)


STYLES = {s.name: s for s in [
    Style("forward", module=ForwardLM),
    Style("hf-attribute"),
    Style("forward-dict", module=ForwardDictLM),
    Style("peft-lora", peft=True),
    Style("peft-lora-separate", peft=True, lora="separate"),
    Style("bf16-true", trainer={"precision": "bf16-true"}),
    Style("bf16-mixed", trainer={"precision": "bf16-mixed"}),
    Style("16-mixed", trainer={"precision": "16-mixed"}),
    Style("gpt2", arch="gpt2"),
    Style("accumulate+val", trainer={"accumulate_grad_batches": 2, "val_check_interval": 2}),
    Style("resume", resume=True),
]}

#: setup name -> (callbacks factory, export format written at fit end)
SETUPS = ("qat", "qat+packed-validation", "gptq", "awq", "int8", "gptq+report", "gptq+export")


def build_model(style: Style) -> torch.nn.Module:
    model = {"llama": testing.tiny_llama, "gpt2": testing.tiny_gpt2}[style.arch]()
    if style.peft:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.0))
    return model


def callbacks(setup: str, out: Path, lora: str = "merged") -> list[pl.Callback]:
    exp = {"format": "int8" if setup == "int8" else "gptq", "path": str(out / "export")}
    if setup == "qat":
        return [QuantizationAwareTraining(SPEC, export_on_fit_end=exp, lora=lora)]
    if setup == "qat+packed-validation":
        return [QuantizationAwareTraining(SPEC, export_on_fit_end=exp, lora=lora), PackedValidation()]
    if setup in ("gptq", "gptq+export"):
        return [GPTQ(SPEC, num_samples=2, export_on_fit_end=exp, lora=lora)]
    if setup == "awq":
        return [AWQ(SPEC, num_samples=2, export_on_fit_end=exp, lora=lora)]
    if setup == "int8":
        return [LLMInt8(export_on_fit_end=exp, lora=lora)]
    if setup == "gptq+report":
        return [GPTQ(SPEC, num_samples=2, export_on_fit_end=exp, lora=lora),
                QuantizationReport(str(out / "report"), num_batches=1)]
    raise ValueError(setup)


def make_trainer(style: Style, cbs: list, out: Path, max_steps: int, **kw) -> pl.Trainer:
    args = {"accelerator": "cpu", "devices": 1, "max_steps": max_steps, "logger": False,
            "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
            "num_sanity_val_steps": 0, "limit_val_batches": 1, "default_root_dir": str(out), "callbacks": cbs}
    args.update(style.trainer)
    args.update(kw)
    return pl.Trainer(**args)


def fit(style: Style, setup: str, out: Path, max_steps: int = 4, **trainer_kw) -> pl.LightningModule:
    """Build the script's module, fit it with the setup's callbacks (resuming halfway for the resume style)."""
    train, val = loaders("forward" if style.module is ForwardLM else "dict")
    if style.resume:
        from lightning.pytorch.callbacks import ModelCheckpoint

        torch.manual_seed(0)
        first = style.module(build_model(style))
        ckpt = ModelCheckpoint(dirpath=str(out / "ckpt"), every_n_epochs=1, save_on_train_epoch_end=True, save_top_k=1)
        make_trainer(style, [*callbacks(setup, out / "first", style.lora), ckpt], out, max_steps // 2,
                     enable_checkpointing=True, **trainer_kw).fit(first, train, val)
        path = next((out / "ckpt").glob("*.ckpt"))
        lm = style.module(build_model(style))
        make_trainer(style, callbacks(setup, out, style.lora), out, max_steps, **trainer_kw).fit(
            lm, train, val, ckpt_path=str(path))
        return lm
    torch.manual_seed(0)
    lm = style.module(build_model(style))
    make_trainer(style, callbacks(setup, out, style.lora), out, max_steps, **trainer_kw).fit(lm, train, val)
    return lm


def hf_model(lm: pl.LightningModule) -> torch.nn.Module:
    """The transformers model inside the user's module (under a peft wrapper if any)."""
    from transformers import PreTrainedModel

    return next(m for m in lm.modules() if isinstance(m, PreTrainedModel))


def float_projection_names(style: Style) -> set[str]:
    """Logical names (relative to the transformers model) of every projection a callback must quantize."""
    from lightning_quant.targets import is_linear_like

    model = {"llama": testing.tiny_llama, "gpt2": testing.tiny_gpt2}[style.arch]()
    return {n for n, m in model.named_modules() if is_linear_like(m) and n != "lm_head"}


def eval_ids(n: int = 2) -> torch.Tensor:
    return collate_tensor([PaddedText(n, 7)[i][: SEQ // 2] for i in range(n)])


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits.float()


def spawn_two(worker, out: Path, *args) -> Path:
    """Run ``worker(rank, port, str(out), *args)`` in 2 processes (a fresh local port) and return ``out``."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, str(out), *args), nprocs=2, join=True)
    return out


def join_as_rank(rank: int, port: int) -> None:
    """What a launcher sets for one of 2 local ranks (Lightning then skips its own launcher); 1 thread each."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")


def ddp_worker(rank: int, port: int, out_dir: str, setups: list[str]) -> None:
    """One rank of a 2-process gloo DDP ``Trainer.fit`` for each setup (HF-attribute style).

    Rank 0 saves, per setup, the float weights just before quantization (a callback listed first), the
    quantized layers' state and the logits of the in-memory model; the test compares them with one process.
    """
    join_as_rank(rank, port)
    style = STYLES["hf-attribute"]
    for setup in setups:
        out = Path(out_dir) / setup
        snap = FloatSnapshot()
        train, val = loaders("dict")
        torch.manual_seed(0)
        lm = HFLM(build_model(style))
        make_trainer(style, [snap, *callbacks(setup, out)], out, 2, strategy="ddp", devices=2).fit(lm, train, val)
        torch.save({"float": snap.state, "quantized": quantized_state(lm), "logits": logits(hf_model(lm), eval_ids()),
                    "calibration": snap.batches}, out / f"rank{rank}.pt")


class FloatSnapshot(pl.Callback):
    """Keeps the float weights at ``on_fit_end`` (listed before the PTQ callback, so it runs first) and this
    rank's share of the calibration batches, as the PTQ callback draws them."""

    def __init__(self) -> None:
        self.state, self.batches = None, []

    def on_fit_end(self, trainer, pl_module):
        from lightning_quant.calibration.distributed import full_state_dict, gathered_root, is_sharded

        model = hf_model(pl_module)  # sharded (FSDP): every rank gathers, rank 0 keeps the full state
        with gathered_root(trainer):  # FSDP1: the root unit's own parameters
            self.state = full_state_dict(model) if is_sharded(model) else {
                k: v.detach().clone() for k, v in model.state_dict().items()}
        ptq = [cb for cb in trainer.callbacks if hasattr(cb, "calibration_batches")]
        self.batches = ptq[0].calibration_batches(trainer) if ptq else []


def quantized_state(lm: pl.LightningModule) -> dict[str, torch.Tensor]:
    """The state of every packed / int8 layer of the transformers model (codes, scales, zeros)."""
    from lightning_quant.layers.int8 import Int8OutlierLinear
    from lightning_quant.layers.packed import PackedLinear

    model = hf_model(lm)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (PackedLinear, Int8OutlierLinear)):
            out.update({f"{name}.{k}": v.clone() for k, v in m.state_dict().items()})
    return out


def reload(out: Path) -> torch.nn.Module:
    return export.load(out / "export")
