"""FSDP2 through Lightning's ``ModelParallelStrategy`` (2 gloo processes on CPU, ``fully_shard`` in
``configure_model``): QAT trains sharded, converts one FSDP unit at a time, and exports one full checkpoint
from rank 0 — with the codes of one process trained on the same data; GPTQ at fit end calibrates one
gathered block at a time, and AWQ / LLM.int8 too, each with the codes of one process.

FSDP1 through Lightning's ``FSDPStrategy`` (decoder layers auto-wrapped) the same way, on CPU:
Lightning refuses ``FSDPStrategy`` without CUDA by a check on the strategy's exact type, and torch's FSDP1
runs on CPU once given ``device_id=cpu``, so :class:`CPUFSDPStrategy` (a subclass that wraps with that
device) runs the real FSDP1 code paths with 2 gloo processes. A CUDA test runs the stock strategy."""

from __future__ import annotations

import itertools
import shutil
from contextlib import contextmanager
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


class MomentumLM(C.HFLM):
    """With optimizer state (FSDP1's sharded optimizer-state loading rejects the empty state of plain SGD)."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _trainer(out: Path, callbacks, **kw):
    return C.make_trainer(C.STYLES["hf-attribute"], callbacks, out, 2, limit_val_batches=1, **kw)


@contextmanager
def counting_unsharded_blocks():
    """Patch :func:`distributed.unsharded` (every gather of the library goes through it: blocks, layers,
    unwrapping, the FSDP1 root) to count the decoder-layer units unsharded at once; yields ``[peak]``."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lightning_quant.calibration import distributed

    inner, active, peak = distributed.unsharded, [0], [0]

    @contextmanager
    def counting(unit, *args, **kw):
        block = unit is not None and isinstance(distributed.runnable(unit), LlamaDecoderLayer)
        active[0] += block
        peak[0] = max(peak[0], active[0])
        try:
            with inner(unit, *args, **kw):
                yield
        finally:
            active[0] -= block

    distributed.unsharded = counting
    try:
        yield peak
    finally:
        distributed.unsharded = inner


def _worker(rank: int, port: int, out_dir: str) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    C.join_as_rank(rank, port)
    out = Path(out_dir)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    torch.manual_seed(0)
    lm = ShardedLM(testing.tiny_llama())
    cbs = [QuantizationAwareTraining(SPEC, export_on_fit_end={"format": "gptq", "path": str(out / "export")}),
           PackedValidation()]
    with counting_unsharded_blocks() as peak:
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


def _fsdp2_strategy():
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)


def _resume(out: Path, rank: int, module=None, strategy=None, observers=("moving_average", "lsq")) -> None:
    """Sharded QAT resumed from its mid-run (distributed) checkpoint == uninterrupted: observer state (the
    moving averages; LSQ's learned scales, sharded parameters) and the enabled flags travel in it."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    module, strategy = module or ShardedLM, strategy or _fsdp2_strategy
    states = {}
    for observer, name in itertools.product(observers, ("straight", "first", "resumed")):
        torch.manual_seed(0)
        lm = module(testing.tiny_llama())
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
    _assert_qat_equals_one_process(fsdp_run, tmp_path, "FSDP2")


def _assert_qat_equals_one_process(run: Path, tmp_path: Path, kind: str) -> None:
    ranks = [torch.load(run / f"rank{r}.pt") for r in range(2)]
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
    print(f"{kind} vs one process: {flips} of {total} codes differ")
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
    _assert_ptq_equals_one_process(fsdp_run, name, 0 if name == "int8" else 1)  # int8 runs no calibration blocks


def _assert_ptq_equals_one_process(run: Path, name: str, peak: int) -> None:
    from lightning_quant import quantize_model

    ranks = [torch.load(run / f"{name}{r}.pt") for r in range(2)]
    for r in ranks:
        assert r["peak_blocks"] == peak
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
    reloaded = export.load(run / f"{name}_export")
    torch.testing.assert_close(C.logits(reloaded, C.eval_ids()), ranks[0]["logits"], rtol=0, atol=0)


def test_tensor_parallelism_is_refused_naming_the_fix():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy

    tp = SimpleNamespace(strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2))
    for cb in (GPTQ(SPEC), QuantizationAwareTraining(SPEC)):
        with pytest.raises(TypeError, match="tensor_parallel_size=2 shards weights across devices inside a layer"):
            cb.setup(tp, None, "fit")


# ---- FSDP1: FSDPStrategy ---------------------------------------------------------------------------
def _fsdp1_strategy(**kw):
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    class CPUFSDPStrategy(FSDPStrategy):
        """Lightning's FSDPStrategy, wrapping with ``device_id=cpu`` (all it lacks on CPU; see the module doc)."""

        def _setup_model(self, model):
            from torch.distributed.fsdp import FullyShardedDataParallel

            return FullyShardedDataParallel(model, sharding_strategy=self.sharding_strategy,
                                            device_id=torch.device("cpu"), **self.kwargs)

    return CPUFSDPStrategy(auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}), **kw)


def _fsdp1_worker(rank: int, port: int, out_dir: str) -> None:
    """QAT (+ PackedValidation, export) and each PTQ callback under FSDP1; every rank saves what it holds."""
    from lightning_quant.calibration.distributed import gathered_root

    C.join_as_rank(rank, port)
    out = Path(out_dir)
    torch.manual_seed(0)
    lm = PlainLM(testing.tiny_llama())
    cbs = [QuantizationAwareTraining(SPEC, export_on_fit_end={"format": "gptq", "path": str(out / "export")}),
           PackedValidation()]
    trainer = _trainer(out, cbs, strategy=_fsdp1_strategy(), devices=2)
    with counting_unsharded_blocks() as peak:
        trainer.fit(lm, _loader(2), _loader(2))
    with gathered_root(trainer):  # the root unit's embeddings / head: FSDP1 gathers them only in its own forward
        logits = C.logits(lm.model, C.eval_ids())
    torch.save({"quantized": C.quantized_state(lm), "logits": logits, "peak_unsharded": peak[0],
                "state_keys": sorted(lm.state_dict())}, out / f"rank{rank}.pt")
    # Lightning's sharded FSDP1 checkpoint (torch's full FSDP1 state dict crashes on CPU, a native fault)
    _resume(out, rank, MomentumLM, lambda: _fsdp1_strategy(state_dict_type="sharded"), observers=("lsq",))
    for name, make in PTQ.items():
        torch.manual_seed(0)
        lm = PlainLM(testing.tiny_llama())
        snap, cb = C.FloatSnapshot(), make(out / f"{name}_export")
        trainer = _trainer(out / name, [snap, cb], strategy=_fsdp1_strategy(), devices=2)
        with counting_unsharded_blocks() as peak:
            trainer.fit(lm, _loader(2))
        with gathered_root(trainer):
            logits = C.logits(lm.model, C.eval_ids())
        torch.save({"float": snap.state, "calibration": snap.batches, "quantized": C.quantized_state(lm),
                    "logits": logits, "peak_blocks": peak[0]}, out / f"{name}{rank}.pt")


@pytest.fixture(scope="module")
def fsdp1_run(tmp_path_factory):
    return C.spawn_two(_fsdp1_worker, tmp_path_factory.mktemp("fsdp1"))


def test_qat_under_fsdp1_equals_one_process(fsdp1_run, tmp_path):
    """FSDP1 QAT converts one unit at a time (each converted unit then unwrapped: packed layers and the
    unit's norms full on every rank), so the model's ``state_dict`` is consistent; codes as one process."""
    _assert_qat_equals_one_process(fsdp1_run, tmp_path, "FSDP1")
    keys = torch.load(fsdp1_run / "rank0.pt")["state_keys"]
    assert "model.model.layers.0.self_attn.q_proj.qweight" in keys
    assert not [k for k in keys if "_fsdp_wrapped_module" in k or k.endswith("q_proj.weight")]


def test_fsdp1_export_is_one_full_checkpoint_from_rank_0(fsdp1_run):
    reloaded = export.load(fsdp1_run / "export")
    logits = torch.load(fsdp1_run / "rank0.pt")["logits"]
    torch.testing.assert_close(C.logits(reloaded, C.eval_ids()), logits, rtol=0, atol=0)


def test_fsdp1_qat_resumes_from_its_checkpoint(fsdp1_run):
    """LSQ's learned scales are FSDP1-sharded parameters: resumed == uninterrupted, on every rank."""
    for r in range(2):
        runs = torch.load(fsdp1_run / f"resume{r}.pt")
        straight, resumed = runs["lsq", "straight"], runs["lsq", "resumed"]
        assert resumed.keys() == straight.keys() and straight
        for k, v in straight.items():
            assert torch.equal(resumed[k], v), k


@pytest.mark.parametrize("name", sorted(PTQ))
def test_ptq_under_fsdp1_equals_one_process_one_block_at_a_time(name, fsdp1_run):
    """As under FSDP2: one summoned block at a time (for the block's calibration, then for unwrapping it to
    swap its packed layers in), the codes of one process, the export reloading with the in-memory logits."""
    _assert_ptq_equals_one_process(fsdp1_run, name, 1)


def test_fsdp1_refuses_layers_of_the_root_unit_naming_the_fix():
    from types import SimpleNamespace

    from torch import nn

    from lightning_quant.calibration.distributed import check_fsdp1_placement

    class Root(nn.Module):  # stands for FSDP1's root wrapper: only its type is looked at
        pass

    from torch.distributed import fsdp

    root = fsdp.FullyShardedDataParallel.__new__(fsdp.FullyShardedDataParallel)
    trainer = SimpleNamespace(strategy=SimpleNamespace(model=root))
    model = testing.tiny_llama()
    with pytest.raises(ValueError, match=r"auto_wrap_policy=\{LlamaDecoderLayer\}.*exclude layers outside them"):
        check_fsdp1_placement(trainer, model, ["lm_head"], "GPTQ")
    check_fsdp1_placement(SimpleNamespace(strategy=SimpleNamespace(model=model)), model, ["lm_head"], "GPTQ")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the stock FSDPStrategy (FSDP1) needs a CUDA device")
def test_qat_and_gptq_under_stock_fsdp1_on_one_gpu(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lightning_quant.calibration.distributed import gathered_root

    for name in ("qat", "gptq"):
        torch.manual_seed(0)
        lm = PlainLM(testing.tiny_llama())
        exp = {"format": "gptq", "path": str(tmp_path / name)}
        cb = QuantizationAwareTraining(SPEC, export_on_fit_end=exp) if name == "qat" else GPTQ(
            SPEC, num_samples=2, export_on_fit_end=exp)
        trainer = pl.Trainer(accelerator="cuda", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                             strategy=FSDPStrategy(auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer})),
                             enable_progress_bar=False, callbacks=[cb])
        trainer.fit(lm, _loader(2))
        ids = C.eval_ids().cuda()
        with gathered_root(trainer):
            want = C.logits(lm.model, ids)
        reloaded = export.load(tmp_path / name).cuda()
        torch.testing.assert_close(C.logits(reloaded, ids), want, rtol=0, atol=0)
