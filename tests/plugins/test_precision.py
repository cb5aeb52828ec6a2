import socket

import pytest
import torch
import torch.multiprocessing as mp

from lightning_quant import qat
from lightning_quant.callbacks import QuantizationAwareTraining
from lightning_quant.plugins import QuantizationPrecision
from lightning_quant.spec import ActivationSpec, QuantSpec
from tests.qat.helpers import TinyCausalLM, ddp_worker, token_loader, trainer

SPEC = QuantSpec(4, 32)


def test_plugin_and_callback_share_one_implementation():
    via_plugin, via_callback = TinyCausalLM(), TinyCausalLM()
    trainer(4, plugins=[QuantizationPrecision(SPEC, ActivationSpec(), observer="lsq")]).fit(via_plugin, token_loader())
    cb = QuantizationAwareTraining(SPEC, ActivationSpec(), observer="lsq", convert_on_fit_end=False)
    trainer(4, callbacks=[cb]).fit(via_callback, token_loader())
    assert len(qat.fake_quant_modules(via_plugin)) == 14
    a, b = via_plugin.state_dict(), via_callback.state_dict()
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_plugin_wraps_a_mixed_inner_precision_and_applies_start_step():
    lm = TinyCausalLM()
    plugin = QuantizationPrecision(SPEC, start_step=2, inner="bf16-mixed", device="cpu")
    t = trainer(4, plugins=[plugin])
    t.fit(lm, token_loader())
    assert t.precision == "bf16-mixed" and type(t.strategy.precision_plugin) is QuantizationPrecision
    assert lm.enabled_log == [False, False, True, True]
    assert all(torch.isfinite(torch.tensor(lm.losses)))


def test_bad_plugin_arguments_raise():
    with pytest.raises(ValueError, match="inner='fp8' is not supported; use one of"):
        QuantizationPrecision(SPEC, inner="fp8")
    with pytest.raises(ValueError, match="device='tpu' is not supported for mixed precision"):
        QuantizationPrecision(SPEC, inner="bf16-mixed", device="tpu")
    with pytest.raises(TypeError, match="must not itself be a QuantizationPrecision"):
        QuantizationPrecision(SPEC, inner=QuantizationPrecision(SPEC))
    with pytest.raises(ValueError, match="start_step must be an int >= 0"):
        QuantizationPrecision(SPEC, start_step=-3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_gloo_end_with_identical_weights(tmp_path):
    mp.spawn(ddp_worker, args=(_free_port(), str(tmp_path), 3), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["n_fq"] == r1["n_fq"] == 14
    assert r0["losses"] != r1["losses"]  # each rank saw its own shard of the data
    init = TinyCausalLM().state_dict()
    moved = [k for k in init if not torch.equal(init[k], r0["state"][k])]
    assert moved  # training happened
    assert set(r0["state"]) == set(r1["state"]) and any(".observer.scale" in k for k in r0["state"])
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k


def test_every_precision_method_is_delegated_or_defined():
    """No Lightning Precision method falls through to the base class: each is the plugin's own or the inner's."""
    import inspect

    from lightning.pytorch.plugins.precision import MixedPrecision, Precision

    from lightning_quant.plugins.precision import DELEGATED, QuantizationPrecision

    public = {n for n, _ in inspect.getmembers(Precision, inspect.isfunction) if not n.startswith("_")}
    own = {"convert_module", "optimizer_step"}
    assert public - own - set(DELEGATED) == set(), "add the new Precision method(s) to DELEGATED"
    plugin = QuantizationPrecision(QuantSpec(4, 32), inner="bf16-mixed", device="cpu")
    assert isinstance(plugin.inner, MixedPrecision)
    calls = []
    plugin.inner.convert_input = lambda data: calls.append(data) or "converted"
    assert plugin.convert_input(7) == "converted" and calls == [7]
    assert plugin.state_dict() == plugin.inner.state_dict()
