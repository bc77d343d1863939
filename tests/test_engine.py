"""The plain-PyTorch training parts that need more than one process: epoch stats over ranks."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.engine import all_reduce_stats

# Two ranks with different losses, image counts and times.
RANK_STATS = [{"loss": 1.0, "images": 8, "seconds": 2.0}, {"loss": 3.0, "images": 4, "seconds": 5.0}]


def _reduce_on_rank(rank: int, store_path: str, results) -> None:
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    try:
        results[rank] = all_reduce_stats(RANK_STATS[rank], torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def test_stats_without_a_process_group_are_this_ranks():
    assert all_reduce_stats(RANK_STATS[1], torch.device("cpu")) == RANK_STATS[1]


def test_stats_over_two_ranks_weigh_loss_by_images_and_take_the_slowest_time(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_reduce_on_rank, args=(str(tmp_path / "store"), results), nprocs=2, join=True)
        results = dict(results)
    expected = {"loss": pytest.approx((1.0 * 8 + 3.0 * 4) / 12), "images": 12, "seconds": 5.0}
    assert results[0] == expected and results[1] == expected
