"""LightningDataModule for the toy data: batches of sources [B, N, T] and their mean mix [B, T]."""
from torch.utils.data import Dataset

from datamodules.loaders import SplitDataModule
from datamodules.toy_waveforms import check_source_names, toy_example

# Example i of val (test) is drawn from generator seed 10_000_000 + i (20_000_000 + i) whatever the run
# seed, so every run is scored on the same mixtures. Training data follows the run seed and skips the
# band [10M, 30M) that val and test use. torch's CPU generator keeps only the low 32 bits of a seed.
SPLITS = ("train", "val", "test")
EVAL_SEED_OFFSET = {"val": 10_000_000, "test": 20_000_000}
EVAL_BAND = (10_000_000, 30_000_000)
SPLIT_MAX_SIZE = 10_000_000
TRAIN_SEED_STRIDE = 1_000_003


def example_seed(split, index, run_seed):
    if split != "train":
        return EVAL_SEED_OFFSET[split] + index
    # Run seeds 0-9 keep the training data they always had; later ones wrap around the eval band.
    low, high = EVAL_BAND
    value = (TRAIN_SEED_STRIDE * run_seed + index) % (2**32 - (high - low))
    return value + (high - low) if value >= low else value


class ToyDataset(Dataset):
    def __init__(self, split, size, sources, length, sample_rate, seed=0):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {list(SPLITS)}")
        check_source_names(list(sources))
        if size is None or not 0 <= size <= SPLIT_MAX_SIZE:
            raise ValueError(f"a toy split holds 0 to {SPLIT_MAX_SIZE} examples, got {size} (data.n_val/n_test=null "
                             f"means every frame for musdb18 and slakh2100 only)")
        self.split, self.size, self.sources = split, size, list(sources)
        self.length, self.sample_rate, self.seed = length, sample_rate, seed

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        if not 0 <= index < self.size:
            raise IndexError(index)
        seed = example_seed(self.split, index, self.seed)
        sources = toy_example(seed, self.sources, self.length, self.sample_rate)
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
