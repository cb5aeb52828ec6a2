import pytest
import torch

from lightning_quant import QuantSpec
from lightning_quant.algorithms.awq import AWQConfig
from lightning_quant.algorithms.gptq import GPTQConfig
from lightning_quant.callbacks import AWQ
from lightning_quant.layers.packed import PackedLinear
from tests.callbacks._ptq_helpers import DM, LM, logged_keys, trainer

SPEC = QuantSpec(4, 32)


def _packed(module):
    return {n: m for n, m in module.named_modules() if isinstance(m, PackedLinear)}


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_awq_on_fit_end_folds_reports_and_logs(tmp_path, arch):
    cb = AWQ(SPEC, AWQConfig(n_grid=5, clip_grid=3), num_samples=3)
    model = LM(arch)
    t = trainer(tmp_path, cb)
    t.fit(model, datamodule=DM())
    packed = _packed(model)
    assert set(packed) == set(cb.quantized_weights) and len(packed) == (14 if arch == "llama" else 12)
    explicit = {n for n, m in packed.items() if m.input_scale is not None}
    reported = {n for g in cb.summary["explicit"] for n in g.split(", ")}
    assert explicit == reported
    assert explicit == set()  # GQA o_proj: tied scales fold into v_proj; OPT (family via the LightningModule)
    assert len(cb.summary["folded"]) == 8  # 4 groups per block, 2 blocks
    keys = logged_keys(t)
    first = next(iter(cb.quantized_weights))
    assert {f"awq/{first}/awq_ratio", f"awq/{first}/awq_error", f"awq/{first}/awq_rtn_error"} <= keys
    assert torch.isfinite(model(torch.randint(0, 256, (1, 8)))).all()


def test_awq_manual_with_explicit_dataloader_and_bad_arguments(tmp_path):
    loader = [torch.randint(0, 256, (2, 16)) for _ in range(2)]
    cb = AWQ(SPEC, AWQConfig(n_grid=2, clip_grid=0), num_samples=2, dataloader=loader, when="manual", include=["re:\\.mlp\\."])
    model = LM()
    t = trainer(tmp_path, cb)
    t.fit(model, datamodule=DM())
    assert _packed(model) == {}
    cb.quantize(t, model)
    assert len(_packed(model)) == 6
    with pytest.raises(TypeError, match="must be a AWQConfig"):
        AWQ(SPEC, config=GPTQConfig())
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        AWQ(SPEC, num_samples=0)
