"""Training mixtures without their sources, for the variational posterior: it learns from mixtures alone,
so its training batches carry no ``sources`` key at all (references can't leak into its loss).

* toy data: the toy training mixtures themselves (``{"mix", "index"}`` of each example);
* stems (musdb18, Slakh2100): random sums of stems from different songs: source k of a mixture is a
  random training frame of its own song, the N songs distinct while there are at least N, mixed with the
  dataset's weights (``sum``), so the mixtures are new combinations a real song never had.

Validation and test batches are the wrapped datamodule's, references included: they only monitor.
"""
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset


class MixturesOnly(Dataset):
    def __init__(self, dataset, alpha, independent=False):
        self.dataset, self.independent = dataset, independent
        self.alpha = torch.as_tensor(alpha, dtype=torch.float32)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if not self.independent:
            return {"mix": self.dataset[index]["mix"], "index": index}
        n_sources = len(self.alpha)
        per_song = self.dataset.frames_per_song
        n_songs = len(self.dataset) // per_song
        # Drawn from torch's generator, which Lightning seeds per worker, like the frames' own starts.
        if n_songs >= n_sources:
            songs = torch.randperm(n_songs)[:n_sources].tolist()
        else:
            songs = torch.randint(n_songs, (n_sources,)).tolist()
        stems = [self.dataset[song * per_song + int(torch.randint(per_song, ()))]["sources"][k]
                 for k, song in enumerate(songs)]
        return {"mix": (self.alpha.unsqueeze(1) * torch.stack(stems)).sum(dim=0), "index": index}


class MixtureDataModule(pl.LightningDataModule):
    """``base``'s splits, with its training set served as mixtures only (``MixturesOnly``)."""

    def __init__(self, base, alpha, independent=False, batch_size=None):
        super().__init__()
        self.base, self.alpha, self.independent = base, alpha, independent
        self.batch_size = batch_size or base.batch_size

    def setup(self, stage=None):
        self.base.setup(stage)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(self.base.seed)
        dataset = MixturesOnly(self.base.dataset("train"), self.alpha, self.independent)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=True, drop_last=True, generator=generator,
                          num_workers=self.base.num_workers, persistent_workers=self.base.num_workers > 0)

    def val_dataloader(self):
        return self.base.val_dataloader()

    def test_dataloader(self):
        return self.base.test_dataloader()
