import pytest
import torch

from lightning_quant.calibration import to_batches


def test_tensor_is_split_into_batches():
    ids = torch.arange(5 * 7).view(5, 7)
    b = to_batches(ids, batch_size=2)
    assert [x.input_ids.shape[0] for x in b] == [2, 2, 1]
    assert torch.equal(torch.cat([x.input_ids for x in b]), ids)
    assert to_batches(ids, batch_size=2, max_batches=2)[-1].input_ids.shape[0] == 2


def test_iterable_forms():
    ids = torch.randint(0, 9, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    out = to_batches([ids, {"input_ids": ids, "attention_mask": mask}, (ids, ids), [{"input_ids": ids[0]}]])
    assert all(torch.equal(o.input_ids[: ids.shape[0]], ids[: o.input_ids.shape[0]]) for o in out)
    assert out[1].num_tokens == 10 and out[0].num_tokens == 12
    assert out[3].input_ids.shape == (1, 6)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="yielded no batch"):
        to_batches([])
    with pytest.raises(ValueError, match="No calibration data"):
        to_batches(None)
    with pytest.raises(TypeError, match="integer tensor"):
        to_batches(torch.randn(2, 4))
    with pytest.raises(TypeError, match="needs an 'input_ids' key"):
        to_batches([{"ids": torch.zeros(1, 3, dtype=torch.long)}])
    with pytest.raises(TypeError, match="calibration data must be"):
        to_batches([3.0])
    with pytest.raises(TypeError, match="pass a LongTensor"):
        to_batches("some text")
    with pytest.raises(ValueError, match=r"attention_mask shape"):
        to_batches([{"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 4)}])
    with pytest.raises(ValueError, match="must be \\[B, T\\]"):
        to_batches(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        to_batches(torch.zeros(1, 2, dtype=torch.long), batch_size=0)
