import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
import add_to_existing_trainer


def test_one_added_line_trains_and_converts(tmp_path):
    src = (ROOT / "examples" / "add_to_existing_trainer.py").read_text()
    assert src.count("# <- the one added line") == 1
    trainer = add_to_existing_trainer.main(["--model", "tiny-llama", "--steps", "2", "--out", str(tmp_path)])
    from lightning_quant.layers import PackedLinear

    packed = [m for m in trainer.lightning_module.modules() if isinstance(m, PackedLinear)]
    assert trainer.global_step == 2 and len(packed) == 14  # 2 blocks x 7 linears; lm_head stays float
