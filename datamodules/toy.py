"""LightningDataModule for the toy data: batches of sources [B, N, T] and their mean mix [B, T]."""
from torch.utils.data import Dataset

from datamodules.loaders import SplitDataModule
from datamodules.toy_waveforms import check_source_names, toy_example

# Disjoint seed ranges: the test set never changes and never overlaps training.
SPLIT_SEED_OFFSET = {"train": 0, "val": 10_000_000, "test": 20_000_000}


class ToyDataset(Dataset):
    def __init__(self, split, size, sources, length, sample_rate, seed=0):
        if split not in SPLIT_SEED_OFFSET:
            raise ValueError(f"unknown split {split!r}; choose from {list(SPLIT_SEED_OFFSET)}")
        check_source_names(list(sources))
        self.split, self.size, self.sources = split, size, list(sources)
        self.length, self.sample_rate = length, sample_rate
        self.base_seed = SPLIT_SEED_OFFSET[split] + 1_000_003 * seed

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        if not 0 <= index < self.size:
            raise IndexError(index)
        sources = toy_example(self.base_seed + index, self.sources, self.length, self.sample_rate)
        return {"sources": sources, "mix": sources.mean(dim=0), "index": index}


class ToyDataModule(SplitDataModule):
    def __init__(
        self,
        sources=("sine", "square", "saw", "triangle"),
        sample_rate=16000,
        crop_length=16384,
        eval_length=16384,
        batch_size=5,
        eval_batch_size=16,
        n_train=5000,
        n_val=500,
        n_test=1500,
        num_workers=0,
        seed=0,
    ):
        super().__init__()
        check_source_names(list(sources))
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        self.sources = list(sources)
        self.sample_rate = sample_rate
        self.crop_length, self.eval_length = crop_length, eval_length
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.num_workers, self.seed = num_workers, seed

    def dataset(self, split):
        length = self.crop_length if split == "train" else self.eval_length
        return ToyDataset(split, self.sizes[split], self.sources, length, self.sample_rate, self.seed)
