"""QuantizedCheckpointIO: small .ckpt files of converted models that fresh models can validate/test from."""

from __future__ import annotations

import pickle

import lightning.pytorch as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_quant.layers.packed import PackedLinear
from lightning_quant.plugins import QuantizedCheckpointIO
from lightning_quant.plugins.checkpoint_io import MANIFEST_KEY, apply_manifest, packed_manifest
from lightning_quant.spec import QuantSpec
from lightning_quant.testing import random_token_batches, tiny_llama
from tests.export.conftest import mixed_tiny, quantize_packed


class LM(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = tiny_llama()
        self.losses = []

    def _loss(self, batch):
        return self.model(input_ids=batch, labels=batch).loss

    def training_step(self, batch, _):
        return self._loss(batch)

    def validation_step(self, batch, _):
        self.losses.append(self._loss(batch).detach())
        self.log("val_loss", self.losses[-1])

    def test_step(self, batch, _):
        self.log("test_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def _loader():
    return DataLoader(torch.cat(random_token_batches(2, 16, 2)), batch_size=2)


def _trainer(tmp_path, io, **kw):
    return L.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, plugins=[io], callbacks=[io], **kw)


@pytest.fixture
def converted_ckpt(tmp_path):
    io = QuantizedCheckpointIO()
    module = LM()
    trainer = _trainer(tmp_path, io)
    trainer.fit(module, _loader())
    trainer.save_checkpoint(tmp_path / "float.ckpt")
    quantize_packed(module.model, QuantSpec(bits=4, group_size=32, symmetric=False), act_order=True)
    trainer.save_checkpoint(tmp_path / "packed.ckpt")
    return module, tmp_path


def test_fresh_model_validates_and_tests_from_packed_ckpt(converted_ckpt):
    module, tmp_path = converted_ckpt
    ratio = (tmp_path / "packed.ckpt").stat().st_size / (tmp_path / "float.ckpt").stat().st_size
    print(f"packed/float .ckpt size: {ratio:.3f}")
    assert ratio < 0.5  # optimizer-free checkpoint of a small-vocab model: linears dominate
    module.losses.clear()
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).validate(module, _loader(), verbose=False)
    expected = torch.stack(module.losses)
    fresh = LM()
    io = QuantizedCheckpointIO()
    trainer = _trainer(tmp_path, io)
    trainer.validate(fresh, _loader(), ckpt_path=tmp_path / "packed.ckpt", verbose=False)
    assert isinstance(fresh.model.model.layers[0].mlp.up_proj, PackedLinear)
    assert packed_manifest(fresh) == packed_manifest(module)
    assert torch.equal(torch.stack(fresh.losses), expected)
    out = trainer.test(fresh, _loader(), ckpt_path=tmp_path / "packed.ckpt", verbose=False)
    assert out[0]["test_loss"] > 0


def test_converted_model_refuses_float_ckpt(converted_ckpt):
    module, tmp_path = converted_ckpt
    with pytest.raises(ValueError, match="holds float weights for .* already converted"):
        _trainer(tmp_path, QuantizedCheckpointIO()).validate(module, _loader(), ckpt_path=tmp_path / "float.ckpt")


def test_plugin_without_callback_raises(tmp_path):
    io = QuantizedCheckpointIO()
    module = LM()
    quantize_packed(module.model, QuantSpec(4, 32))
    trainer = L.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=1, logger=False, plugins=[io],
                        enable_progress_bar=False, enable_checkpointing=False)
    trainer.validate(module, _loader(), verbose=False)
    with pytest.raises(RuntimeError, match=r"same QuantizedCheckpointIO instance in Trainer\(callbacks"):
        trainer.save_checkpoint(tmp_path / "x.ckpt")


def test_atomic_save_keeps_previous_ckpt(tmp_path, monkeypatch):
    io = QuantizedCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, tmp_path / "a.ckpt")
    before = (tmp_path / "a.ckpt").read_bytes()

    def crash(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, tmp_path / "a.ckpt")
    assert (tmp_path / "a.ckpt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]


class Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_payload_refused(tmp_path):
    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": {}, "x": Payload()}, f)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        QuantizedCheckpointIO().load_checkpoint(tmp_path / "evil.ckpt")


def test_apply_manifest_errors():
    model = quantize_packed(tiny_llama(), QuantSpec(4, 32))
    manifest = packed_manifest(model)
    with pytest.raises(ValueError, match="that this model lacks"):
        apply_manifest(tiny_llama(), {"model.nope": next(iter(manifest.values()))})
    other = dict(manifest)
    name = next(iter(other))
    other[name] = {**other[name], "spec": QuantSpec(8, 32).to_dict()}
    with pytest.raises(ValueError, match=f"Layer '{name}' is packed as"):
        apply_manifest(model, other)
    with pytest.raises(TypeError, match="weights_only must be True or False"):
        QuantizedCheckpointIO(weights_only="yes")
    assert MANIFEST_KEY == "lightning_quant_packed_layers"


def test_sharded_strategies_are_refused_naming_what_to_use():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_quant.plugins import QuantizedCheckpointIO

    trainer = SimpleNamespace(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    with pytest.raises(TypeError, match="under ModelParallelStrategy the strategy writes its own sharded "
                                        "checkpoints.*export_on_fit_end"):
        QuantizedCheckpointIO().setup(trainer, None, "fit")


def _manifest_before_the_registry(model: torch.nn.Module) -> dict[str, dict]:
    """The manifest exactly as QuantizedCheckpointIO wrote it before layer kinds registered themselves."""
    from lightning_quant.layers.int8 import Int8OutlierLinear

    out = {}
    for name, m in model.named_modules():
        base = {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
                "dtype": str(getattr(m, "compute_dtype", torch.float32)).removeprefix("torch.")} \
            if isinstance(m, (PackedLinear, Int8OutlierLinear)) else None
        if isinstance(m, PackedLinear):
            out[name] = {**base, "kind": "packed", "spec": m.spec.to_dict(), "act_order": m.perm is not None,
                         "act_spec": None if m.act_spec is None else m.act_spec.to_dict(),
                         "input_scale": m.input_scale is not None}
        elif isinstance(m, Int8OutlierLinear):
            out[name] = {**base, "kind": "int8", "threshold": float(m.threshold)}
    return out


def test_ckpt_with_todays_manifest_loads_into_a_fresh_model(tmp_path):
    model = mixed_tiny()
    old = _manifest_before_the_registry(model)
    assert packed_manifest(model) == old  # the registry writes the same entries (the same keys and values)
    torch.save({"state_dict": model.state_dict(), MANIFEST_KEY: old}, tmp_path / "old.ckpt")
    io, fresh = QuantizedCheckpointIO(), tiny_llama().eval()
    io._module = fresh  # what setup() records
    checkpoint = io.load_checkpoint(tmp_path / "old.ckpt")
    fresh.load_state_dict(checkpoint["state_dict"])
    assert packed_manifest(fresh) == old
    ids = random_token_batches(1, 12, 2)[0]
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_apply_manifest_names_an_unknown_layer_kind():
    entry = {"kind": "nf4", "in_features": 96, "out_features": 96, "bias": False, "dtype": "float32"}
    with pytest.raises(ValueError, match=r"Unknown layer kind 'nf4'; known kinds: \[.*'int8', 'packed'"):
        apply_manifest(tiny_llama(), {"model.layers.0.self_attn.q_proj": entry})
