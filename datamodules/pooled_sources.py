"""Every source's crops pooled into one class, for the generic "background" prior of the discrimination
report (Ren et al. 2019's likelihood ratio; ``make train-pooled``).

Item i of a pooled split is source ``i % N`` of the wrapped split's item ``i // N``, served as a one-source
example ``{"sources": [1, T], "index": i}``: each source's crops appear equally often, and the same crops as
the per-source priors see (the toy data's examples, the stem datasets' frames).
"""
from torch.utils.data import Dataset

from datamodules.loaders import SplitDataModule

POOLED_SOURCE = "pooled"  # the one source name of a pooled prior


class PooledSources(Dataset):
    def __init__(self, dataset, n_sources):
        if n_sources < 1:
            raise ValueError(f"a pooled dataset needs at least one source, got {n_sources}")
        self.dataset, self.n_sources = dataset, n_sources

    def __len__(self):
        return len(self.dataset) * self.n_sources

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(index)
        example, source = divmod(index, self.n_sources)
        crop = self.dataset[example]["sources"][source: source + 1]
        return {"sources": crop, "index": index}


class PooledDataModule(SplitDataModule):
    """``base``'s splits with all of its sources pooled (``PooledSources``), batched as ``base`` batches."""

    def __init__(self, base):
        super().__init__()
        self.base, self.sources = base, [POOLED_SOURCE]
        self.batch_size, self.eval_batch_size = base.batch_size, base.eval_batch_size
        self.num_workers, self.seed = base.num_workers, base.seed

    def setup(self, stage=None):
        self.base.setup(stage)

    def dataset(self, split):
        return PooledSources(self.base.dataset(split), len(self.base.sources))
