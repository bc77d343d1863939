"""How the training split reaches Ray Train's workers: Ray Train's ``DataConfig`` with one
change for a dataset already in the object store.

Ray Train splits a dataset with ``streaming_split``: a coordinator actor starts a new
streaming execution every epoch and hands each worker its blocks one remote call at a
time. For a split that has been read into the object store once (``train.materialize``)
there is nothing left to stream: ``Dataset.split(n, equal=True)`` cuts the blocks into
one fixed shard per worker, once, and every epoch is a local iteration over it. Measured
on the 2-core machine, the wait for an epoch's first batch fell from 2-4 s to about
0.1 s (README, "Training"). A lazy dataset keeps Ray Train's streaming split.
"""

from __future__ import annotations

from ray.data.dataset import MaterializedDataset
from ray.train import DataConfig


class ShardConfig(DataConfig):
    """``DataConfig`` that gives each worker a fixed, equal shard of a materialised dataset
    (every epoch the same rows, in an order each worker reshuffles locally)."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        to_split = set(datasets) if self._datasets_to_split == "all" else set(self._datasets_to_split)
        fixed = {name: ds for name, ds in datasets.items()
                 if name in to_split and isinstance(ds, MaterializedDataset)}
        rest = {name: ds for name, ds in datasets.items() if name not in fixed}
        output = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs) if rest \
            else [{} for _ in range(world_size)]
        for name, ds in fixed.items():
            for rank, shard in enumerate(ds.split(world_size, equal=True)):
                output[rank][name] = shard.iterator()
        return output
