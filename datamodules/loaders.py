"""The DataLoaders every datamodule hands to Lightning: seeded shuffled training batches, and
evaluation batches sharded across DDP ranks without padding (each example scored exactly once).
A subclass provides ``dataset(split)`` for "train", "val" and "test"."""
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from datamodules.sharded_sampler import ShardedEvalSampler


class SplitDataModule(pl.LightningDataModule):
    batch_size = eval_batch_size = 1
    num_workers = seed = 0
    test_split = "test"  # "val": the test loop runs on the validation split (choosing settings, never the test set)

    def dataset(self, split):
        raise NotImplementedError

    def train_dataloader(self):
        # Seeded shuffling; Lightning wraps this in a DistributedSampler under DDP.
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.dataset("train"), batch_size=self.batch_size, shuffle=True, drop_last=True,
                          generator=generator, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def eval_dataloader(self, split):
        dataset = self.dataset(split)
        return DataLoader(dataset, batch_size=self.eval_batch_size, sampler=ShardedEvalSampler(len(dataset)),
                          num_workers=self.num_workers)

    def val_dataloader(self):
        return self.eval_dataloader("val")

    def test_dataloader(self):
        return self.eval_dataloader(self.test_split)
