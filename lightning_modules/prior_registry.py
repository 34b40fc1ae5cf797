"""Builds a prior family (one independent prior per source) from its config by name.

Each family is an nn.Module with ``log_prob(x: [B, N, T]) -> [B, N]`` in nats per audio sample;
channel k of ``x`` is scored by the prior of source k. A family trained by another objective than the
likelihood (the score priors' denoising score matching) also has ``training_loss(x, generator) -> [B, N]``
and names it in ``training_metric``. New families register here.
"""
from dataclasses import asdict, fields

from lightning_modules.nn.flowavenet import FloWaveNet, FlowConfig
from lightning_modules.nn.latent_prior import LatentPrior, LatentPriorConfig
from lightning_modules.nn.score_prior import ScoreConfig, ScorePrior
from lightning_modules.nn.wavenet import WaveNet, WaveNetConfig

PRIOR_FAMILIES = {
    "flowavenet": (FloWaveNet, FlowConfig), "wavenet": (WaveNet, WaveNetConfig), "score": (ScorePrior, ScoreConfig),
    "lqvae": (LatentPrior, LatentPriorConfig),
}


def resolve_model_config(model_config: dict) -> dict:
    """Name plus every option of the family, unset (None) ones filled with the family's defaults."""
    config = {key: value for key, value in dict(model_config).items() if value is not None}
    name = config.pop("name", None)
    if name not in PRIOR_FAMILIES:
        raise ValueError(f"unknown model name {name!r}; choose from {sorted(PRIOR_FAMILIES)}")
    config_class = PRIOR_FAMILIES[name][1]
    known = {field.name for field in fields(config_class)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for model {name!r}; known: {sorted(known)}")
    return {"name": name, **asdict(config_class(**config))}


def build_prior(model_config: dict, n_sources: int):
    options = resolve_model_config(model_config)
    family, config_class = PRIOR_FAMILIES[options.pop("name")]
    return family(n_sources, config_class(**options))


def is_noise_conditional(model_config: dict) -> bool:
    """True for a family with one network for every noise level (nothing to fine-tune per sigma)."""
    family = PRIOR_FAMILIES[resolve_model_config(model_config)["name"]][0]
    return bool(getattr(family, "noise_conditional", False))
