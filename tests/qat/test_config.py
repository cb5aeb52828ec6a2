import pytest

from lightning_quant.qat import QATConfig
from lightning_quant.spec import ActivationSpec, QuantSpec


def test_defaults_and_normalised_filters():
    cfg = QATConfig(QuantSpec(4, 32), include=["q_proj"])
    assert cfg.include == ("q_proj",) and cfg.exclude == ("lm_head",) and cfg.observer == "minmax"
    assert cfg.lora == "merged" and cfg.start_step == 0


@pytest.mark.parametrize("kwargs, err, match", [
    ({"spec": "w4"}, TypeError, "spec must be a QuantSpec"),
    ({"act_spec": "int8"}, TypeError, "act_spec must be an ActivationSpec"),
    ({"spec": QuantSpec(3, 32), "act_spec": ActivationSpec()}, ValueError, "use bits in \\(4, 8\\)"),
    ({"include": "q_proj"}, ValueError, "write \\['q_proj'\\]"),
    ({"exclude": [""]}, ValueError, "non-empty strings"),
    ({"observer": "ema"}, ValueError, "use one of \\['lsq', 'minmax', 'moving_average', 'mse'"),
    ({"lora": "qlora"}, ValueError, "use one of \\('merged', 'separate'\\)"),
    ({"start_step": -1}, ValueError, "start_step must be an int >= 0"),
    ({"start_step": 1.5}, ValueError, "start_step must be an int >= 0"),
])
def test_bad_config_raises(kwargs, err, match):
    kwargs = {"spec": QuantSpec(4, 32), **kwargs}
    with pytest.raises(err, match=match):
        QATConfig(**kwargs)
