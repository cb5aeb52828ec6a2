"""FSDP2 through Lightning's ``ModelParallelStrategy`` (2 gloo processes on CPU, ``fully_shard`` in
``configure_model``): QAT trains sharded, converts one FSDP unit at a time, and exports one full checkpoint
from rank 0 — with the codes of one process trained on the same data; GPTQ at fit end calibrates one
gathered block at a time, and AWQ / LLM.int8 too, each with the codes of one process. FSDP1
(``FSDPStrategy``) needs CUDA: its test skips without a GPU."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_quant import QuantSpec, export, testing
from lightning_quant.callbacks import AWQ, GPTQ, LLMInt8, PackedValidation, QuantizationAwareTraining
from tests import composition as C

SPEC = QuantSpec(4, 32)
SEQ = 16


def _loader(batch_size: int) -> DataLoader:
    """Unpadded dict batches of equal length, so a rank's mean loss times 2 ranks is the global mean."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, testing.TINY_VOCAB, (SEQ,), generator=g) for _ in range(4)]

    def collate(rs):
        ids = torch.stack(rs)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    return DataLoader(rows, batch_size=batch_size, collate_fn=collate)


class ShardedLM(C.HFLM):
    """The user's module, sharding its model with FSDP2 in ``configure_model`` (each decoder layer, then the root)."""

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class PlainLM(C.HFLM):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _trainer(out: Path, callbacks, **kw):
    return C.make_trainer(C.STYLES["hf-attribute"], callbacks, out, 2, limit_val_batches=1, **kw)


def _worker(rank: int, port: int, out_dir: str) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_quant.qat import surgery

    C.join_as_rank(rank, port)
    active, peak = [0], [0]
    inner = surgery.unsharded

    from contextlib import contextmanager

    @contextmanager
    def counting(unit):
        active[0] += unit is not None
        peak[0] = max(peak[0], active[0])
        try:
            with inner(unit):
                yield
        finally:
            active[0] -= unit is not None

    surgery.unsharded = counting
    out = Path(out_dir)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    torch.manual_seed(0)
    lm = ShardedLM(testing.tiny_llama())
    cbs = [QuantizationAwareTraining(SPEC, export_on_fit_end={"format": "gptq", "path": str(out / "export")}),
           PackedValidation()]
    _trainer(out, cbs, strategy=strategy, devices=2).fit(lm, _loader(2), _loader(2))
    logits = C.logits(lm.model, C.eval_ids())  # every rank runs the (sharded) forward
    torch.save({"quantized": C.quantized_state(lm), "logits": logits, "peak_unsharded": peak[0]},
               out / f"rank{rank}.pt")
    _resume(out, rank)
    for name in PTQ:
        _ptq(out, rank, name)


#: each PTQ callback at fit end on the sharded model, exporting in a format that holds its layers
PTQ = {
    "gptq": lambda out: GPTQ(SPEC, num_samples=2, export_on_fit_end={"format": "gptq", "path": str(out)}),
    "awq": lambda out: AWQ(SPEC, num_samples=2, export_on_fit_end={"format": "gptq", "path": str(out)}),
    "int8": lambda out: LLMInt8(stats_batches=2, export_on_fit_end={"format": "int8", "path": str(out)}),
}


def _ptq(out: Path, rank: int, name: str) -> None:
    """One PTQ callback on the sharded model, counting how many decoder blocks are ever unsharded at once."""
    from contextlib import contextmanager

    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.tensor import DTensor

    from lightning_quant.calibration import sequential

    inner, peak = sequential.block_gathered, [0]

    @contextmanager
    def counting(unit):
        with inner(unit):
            full = sum(not isinstance(next(b.parameters()), DTensor) for b in lm.model.model.layers)
            peak[0] = max(peak[0], full)
            yield

    sequential.block_gathered = counting
    torch.manual_seed(0)
    lm = ShardedLM(testing.tiny_llama())
    snap, cb = C.FloatSnapshot(), PTQ[name](out / f"{name}_export")
    _trainer(out / name, [snap, cb], strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
             devices=2).fit(lm, _loader(2))
    sequential.block_gathered = inner
    torch.save({"float": snap.state, "calibration": snap.batches, "quantized": C.quantized_state(lm),
                "logits": C.logits(lm.model, C.eval_ids()), "peak_blocks": peak[0]}, out / f"{name}{rank}.pt")


def _resume(out: Path, rank: int) -> None:
    """Sharded QAT resumed from its mid-run (distributed) checkpoint == uninterrupted: observer state (the
    moving averages; LSQ's learned scales, sharded parameters) and the enabled flags travel in it."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy

    def strategy():
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)

    states = {}
    for observer, name in itertools.product(("moving_average", "lsq"), ("straight", "first", "resumed")):
        torch.manual_seed(0)
        lm = ShardedLM(testing.tiny_llama())
        cbs = [QuantizationAwareTraining(SPEC, observer=observer)]
        kw = {}
        if name == "first":
            cbs.append(ModelCheckpoint(dirpath=str(out / "ckpt"), every_n_epochs=1, save_on_train_epoch_end=True))
            kw["enable_checkpointing"] = True
        steps = 1 if name == "first" else 2
        ckpt = str(next((out / "ckpt").iterdir())) if name == "resumed" else None
        if name == "first":
            shutil.rmtree(out / "ckpt", ignore_errors=True)
        trainer = C.make_trainer(C.STYLES["hf-attribute"], cbs, out / name, steps, strategy=strategy(), devices=2,
                                 limit_val_batches=0, **kw)
        trainer.fit(lm, _loader(2), ckpt_path=ckpt)
        states[observer, name] = C.quantized_state(lm)
    torch.save(states, out / f"resume{rank}.pt")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    return C.spawn_two(_worker, tmp_path_factory.mktemp("fsdp"))


def test_qat_under_fsdp2_equals_one_process(fsdp_run, tmp_path):
    ranks = [torch.load(fsdp_run / f"rank{r}.pt") for r in range(2)]
    for r in ranks:  # converted layers exist, full, on every rank; one FSDP unit unsharded at a time
        assert r["peak_unsharded"] == 1
        assert r["quantized"].keys() == ranks[0]["quantized"].keys()
        assert all(torch.equal(r["quantized"][k], v) for k, v in ranks[0]["quantized"].items())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        single = PlainLM(testing.tiny_llama())
        _trainer(tmp_path, [QuantizationAwareTraining(SPEC)]).fit(single, _loader(4), _loader(2))
    finally:
        torch.set_num_threads(threads)
    want = C.quantized_state(single)
    got = ranks[0]["quantized"]
    assert got.keys() == want.keys() and len(want) == 14 * 2  # 14 layers: qweight, scales (symmetric)
    # gradients are averaged over 2 ranks instead of summed in one batch: float weights agree to ~1e-7,
    # so a code may flip where w/s sits on a rounding boundary; scales (min-max) agree to float rounding
    from lightning_quant import packing

    flips, total = 0, 0
    for k, v in want.items():
        if k.endswith("qweight"):
            a, b = (packing.unpack_rows(t, 4, t.shape[0] * 8) for t in (got[k], v))
            assert int((a.int() - b.int()).abs().max()) <= 1, k
            flips, total = flips + int((a != b).sum()), total + a.numel()
        elif k.endswith("scales"):
            torch.testing.assert_close(got[k].float(), v.float(), rtol=1e-3, atol=0)
    print(f"FSDP2 vs one process: {flips} of {total} codes differ")
    assert flips <= 1e-3 * total, (flips, total)
    torch.testing.assert_close(C.logits(single.model, C.eval_ids()), ranks[0]["logits"], rtol=0, atol=1e-2)


def test_fsdp2_export_is_one_full_checkpoint_from_rank_0(fsdp_run):
    ranks = [torch.load(fsdp_run / f"rank{r}.pt") for r in range(2)]
    reloaded = export.load(fsdp_run / "export")
    torch.testing.assert_close(C.logits(reloaded, C.eval_ids()), ranks[0]["logits"], rtol=0, atol=0)


@pytest.mark.parametrize("observer", ["moving_average", "lsq"])
def test_sharded_qat_resumes_from_its_distributed_checkpoint(observer, fsdp_run):
    for r in range(2):
        runs = torch.load(fsdp_run / f"resume{r}.pt")
        straight, resumed = runs[observer, "straight"], runs[observer, "resumed"]
        assert resumed.keys() == straight.keys() and straight
        for k, v in straight.items():
            assert torch.equal(resumed[k], v), k


@pytest.mark.parametrize("name", sorted(PTQ))
def test_ptq_under_fsdp2_equals_one_process_one_block_at_a_time(name, fsdp_run):
    """PTQ at fit end on the FSDP2-sharded model: each block gathered alone (never two unsharded blocks),
    statistics all-reduced over the ranks' shares: the codes of one process on both ranks' batches, on every
    rank; the export (one full checkpoint from rank 0) reloads with the in-memory logits."""
    from lightning_quant import quantize_model

    ranks = [torch.load(fsdp_run / f"{name}{r}.pt") for r in range(2)]
    for r in ranks:
        assert r["peak_blocks"] == (0 if name == "int8" else 1)  # int8 runs no calibration blocks
        assert r["quantized"].keys() == ranks[0]["quantized"].keys()
        assert all(torch.equal(r["quantized"][k], v) for k, v in ranks[0]["quantized"].items())
    model = testing.tiny_llama()
    model.load_state_dict(ranks[0]["float"])
    calib = None if name == "int8" else ranks[0]["calibration"] + ranks[1]["calibration"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        quantize_model(model, None if name == "int8" else SPEC, name, calibration=calib)
    finally:
        torch.set_num_threads(threads)
    want = C.quantized_state(torch.nn.ModuleDict({"model": model}))
    got = ranks[0]["quantized"]
    assert got.keys() == want.keys() and want
    for k, v in want.items():
        if k.endswith(("qweight", "qzeros", ".weight")):
            assert torch.equal(got[k], v), k
        else:
            torch.testing.assert_close(got[k], v, rtol=1e-6, atol=0)
    reloaded = export.load(fsdp_run / f"{name}_export")
    torch.testing.assert_close(C.logits(reloaded, C.eval_ids()), ranks[0]["logits"], rtol=0, atol=0)


def test_tensor_parallelism_is_refused_naming_the_fix():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy

    tp = SimpleNamespace(strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2))
    for cb in (GPTQ(SPEC), QuantizationAwareTraining(SPEC)):
        with pytest.raises(TypeError, match="tensor_parallel_size=2 shards weights across devices inside a layer"):
            cb.setup(tp, None, "fit")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDPStrategy (FSDP1) needs a CUDA device")
def test_qat_under_fsdp1_on_one_gpu(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import FSDPStrategy

    torch.manual_seed(0)
    lm = PlainLM(testing.tiny_llama())
    cb = QuantizationAwareTraining(SPEC, export_on_fit_end={"format": "gptq", "path": str(tmp_path / "export")})
    pl.Trainer(accelerator="cuda", devices=1, strategy=FSDPStrategy(), max_steps=2, logger=False,
               enable_checkpointing=False, enable_progress_bar=False, callbacks=[cb]).fit(lm, _loader(2))
    reloaded = export.load(tmp_path / "export").cuda()
    ids = C.eval_ids().cuda()
    torch.testing.assert_close(C.logits(reloaded, ids), C.logits(lm.model, ids), rtol=0, atol=0)
