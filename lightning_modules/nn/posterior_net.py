"""The amortised posterior q(s_k | m) of the variational separator (proposal 000; thesis "Modeling the
posteriors"): per source a non-causal gated WaveNet reads the mixture and gives, at every sample, the
parameters of a bounded distribution over that source's waveform.

The N encoders are independent networks sharing one grouped module, as the priors do; they are trained
together because the mixture term couples their samples.

* ``truncated_normal`` (default, the thesis): a normal truncated to [-1, 1]; its location is kept inside
  the interval by a tanh, its scale is ``min_scale + softplus(.)``.
* ``normal``: an unbounded normal with the same parameters (no tanh); the closed-form checks with
  Gaussian priors use it.

With ``init_from_average`` the location starts at the Average baseline m / (N alpha_k) and the network
learns a correction: its last conv is zero-initialised, so before training q's location is that baseline
and its scale ``init_scale``.
"""
import math
from dataclasses import dataclass

import torch
from torch import nn

from lightning_modules.nn.gated_wavenet import GatedWaveNet
from lightning_modules.nn.truncated_normal import TruncatedNormal

DISTRIBUTIONS = ("truncated_normal", "normal")


@dataclass
class PosteriorNetConfig:
    width: int = 32
    n_layers: int = 10  # dilations 1 .. 2^(n_layers-1): a receptive field of about 2^(n_layers+1) samples
    kernel_size: int = 3
    distribution: str = "truncated_normal"
    init_from_average: bool = True
    init_scale: float = 0.1
    min_scale: float = 1e-3


class Normal:
    """torch's Normal with the interface of TruncatedNormal (samples from given uniforms)."""

    def __init__(self, loc, scale):
        self.loc, self.scale = loc, scale
        self.mean, self.variance = loc, scale**2

    def log_prob(self, x):
        return -0.5 * ((x - self.loc) / self.scale) ** 2 - torch.log(self.scale) - 0.5 * math.log(2 * math.pi)

    def entropy(self):
        return 0.5 + 0.5 * math.log(2 * math.pi) + torch.log(self.scale)

    def rsample(self, uniform):
        standard = torch.special.ndtri(uniform.double().clamp(1e-12, 1 - 1e-12)).to(self.loc.dtype)
        return self.loc + self.scale * standard


def inverse_softplus(y):
    return y + math.log(-math.expm1(-y))


class PosteriorNet(nn.Module):
    def __init__(self, n_sources, config: PosteriorNetConfig):
        super().__init__()
        if config.distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown posterior distribution {config.distribution!r}; choose from {list(DISTRIBUTIONS)}")
        if not 0 < config.min_scale < config.init_scale:
            raise ValueError(f"the posterior needs 0 < min_scale < init_scale, got {config.min_scale}, {config.init_scale}")
        self.n_sources, self.config = n_sources, config
        self.encoder = GatedWaveNet(n_sources, 1, 2, config.width, config.n_layers, config.kernel_size, causal=False)
        self.scale_offset = inverse_softplus(config.init_scale - config.min_scale)

    def forward(self, mix, alpha):
        """mix [B, T], alpha [N] -> the posterior over every source: a distribution of shape [B, N, T]."""
        if mix.dim() != 2:
            raise ValueError(f"expected mixtures of shape [batch, time], got {tuple(mix.shape)}")
        alpha = alpha.to(mix).view(1, -1, 1)
        inputs = mix.unsqueeze(1).unsqueeze(2).expand(-1, self.n_sources, 1, -1)  # [B, N, 1, T]
        out = self.encoder(inputs)
        loc_out, scale_out = out[:, :, 0].float(), out[:, :, 1].float()
        scale = self.config.min_scale + nn.functional.softplus(scale_out + self.scale_offset)
        base = mix.float().unsqueeze(1) / (self.n_sources * alpha) if self.config.init_from_average else 0.0
        if self.config.distribution == "normal":
            return self.distribution(base + loc_out, scale)
        base = torch.atanh(torch.as_tensor(base).clamp(-0.999, 0.999))
        return self.distribution(torch.tanh(base + loc_out), scale)

    def distribution(self, loc, scale):
        """The configured family with these parameters, each [B, N, T]."""
        return Normal(loc, scale) if self.config.distribution == "normal" else TruncatedNormal(loc, scale)
