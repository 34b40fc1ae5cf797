"""Builds the datamodule named in the config's ``data`` section: toy, musdb18 or slakh2100."""
from pathlib import Path

from datamodules.musdb18 import MusdbDataModule
from datamodules.slakh2100 import SlakhDataModule
from datamodules.toy import ToyDataModule

DATASETS = {"toy": ToyDataModule, "musdb18": MusdbDataModule, "slakh2100": SlakhDataModule}
# How each dataset's mix is made from its sources: the toy data serves their mean (datamodules/toy.py),
# a real song is the sum of its stems.
MIXING = {"toy": "mean", "musdb18": MusdbDataModule.mixing, "slakh2100": SlakhDataModule.mixing}
# Options only the datasets read from disk take; the toy data is generated and has none of them.
DISK_OPTIONS = ("root", "cache_dir", "frames_per_song", "silence_threshold", "max_tracks")


def build_datamodule(data_config, seed=0, n_test=None, output_root="runs"):
    options = dict(data_config)
    name = options.pop("name")
    if name not in DATASETS:
        raise ValueError(f"unknown dataset data.name={name!r}; choose from {sorted(DATASETS)}")
    if n_test is not None:
        options["n_test"] = n_test
    disk = {key: options.pop(key) for key in DISK_OPTIONS}
    is_wav = options.pop("is_wav")
    if name == "toy":
        return ToyDataModule(seed=seed, **options)
    # Training frames are frames_per_song per song, so n_train is the toy data's alone.
    options.pop("n_train")
    disk["cache_dir"] = disk["cache_dir"] or str(Path(output_root) / "stem_cache")
    if name == "musdb18":
        return MusdbDataModule(seed=seed, is_wav=is_wav, **options, **disk)
    return SlakhDataModule(seed=seed, **options, **disk)


def dataset_mixing(name):
    """'mean' or 'sum': how the mix of dataset ``name`` is made (what separation.mixing=None uses)."""
    if name not in MIXING:
        raise ValueError(f"unknown dataset data.name={name!r}; choose from {sorted(MIXING)}")
    return MIXING[name]
