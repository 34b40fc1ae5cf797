"""Evaluation sampler that splits a dataset across DDP ranks without padding or repeats.

Lightning's default DistributedSampler pads the last shard with repeated examples, which would bias
means computed over the test set; here rank r takes indices r, r + world, r + 2 world, ...
"""
import torch.distributed as dist
from torch.utils.data import DistributedSampler


class ShardedEvalSampler(DistributedSampler):
    # Subclassing DistributedSampler only so Lightning does not wrap it in its own padded sampler.
    def __init__(self, dataset_size, rank=None, world_size=None):  # noqa: super().__init__ not wanted
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        self.indices = list(range(self.rank, dataset_size, self.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)

    def set_epoch(self, epoch):
        pass
