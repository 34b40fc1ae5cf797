"""Builds the datamodule named in the config's ``data`` section."""
from datamodules.toy import ToyDataModule


def build_datamodule(data_config, seed=0, n_test=None):
    options = dict(data_config)
    name = options.pop("name")
    if n_test is not None:
        options["n_test"] = n_test
    if name == "toy":
        return ToyDataModule(seed=seed, **options)
    raise ValueError(f"unknown dataset {name!r}; choose from ['toy']")
