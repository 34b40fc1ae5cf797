"""Builds a prior family (one independent prior per source) from its config by name.

Each family is an nn.Module with ``log_prob(x: [B, N, T]) -> [B, N]`` in nats per audio sample;
channel k of ``x`` is scored by the prior of source k. New families register here.
"""
from dataclasses import fields

from lightning_modules.nn.flowavenet import FloWaveNet, FlowConfig
from lightning_modules.nn.wavenet import WaveNet, WaveNetConfig

PRIOR_FAMILIES = {"flowavenet": (FloWaveNet, FlowConfig), "wavenet": (WaveNet, WaveNetConfig)}


def build_prior(model_config: dict, n_sources: int):
    config = {key: value for key, value in model_config.items() if value is not None}
    name = config.pop("name", None)
    if name not in PRIOR_FAMILIES:
        raise ValueError(f"unknown model name {name!r}; choose from {sorted(PRIOR_FAMILIES)}")
    family, config_class = PRIOR_FAMILIES[name]
    known = {field.name for field in fields(config_class)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for model {name!r}; known: {sorted(known)}")
    return family(n_sources, config_class(**config))
