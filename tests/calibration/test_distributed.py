import pytest
import torch

from lightning_quant.calibration import all_reduce_sum, is_distributed, rank, shard, world_size


def test_single_process_helpers_are_no_ops():
    assert not is_distributed() and world_size() == 1 and rank() == 0
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(t) is t and torch.equal(t, torch.tensor([1.0, 2.0]))


def test_shard_round_robin_and_too_few_batches():
    items = list(range(7))
    parts = [shard(items, r, 3) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(x for p in parts for x in p) == items
    with pytest.raises(ValueError, match="raise num_samples to at least 3"):
        shard([0, 1], 0, 3)
