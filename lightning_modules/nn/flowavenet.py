"""FloWaveNet (Kim et al. 2019) as an unconditional prior over raw audio, one flow per source class.

Layout: ``n_blocks`` blocks of [squeeze, ``n_flows`` x (ActNorm -> AffineCoupling -> flip)], then a
standard-normal base. The ``n_priors`` priors share one module through grouped convolutions but are
fully independent: channel k of the input is scored by prior k only.
"""
import math
from dataclasses import dataclass

import torch
from torch import nn

from lightning_modules.nn.actnorm import ActNorm
from lightning_modules.nn.affine_coupling import AffineCoupling

LOG_2PI = math.log(2 * math.pi)


@dataclass
class FlowConfig:
    n_blocks: int = 4
    n_flows: int = 6
    n_layers: int = 10
    width: int = 32
    kernel_size: int = 3


def squeeze(x):
    """[B, G, C, T] -> [B, G, 2C, T/2]: even samples go to the first half of the channels."""
    batch, groups, channels, time = x.shape
    x = x.view(batch, groups, channels, time // 2, 2).permute(0, 1, 4, 2, 3)
    return x.reshape(batch, groups, 2 * channels, time // 2)


def unsqueeze(x):
    batch, groups, channels, time = x.shape
    x = x.view(batch, groups, 2, channels // 2, time).permute(0, 1, 3, 4, 2)
    return x.reshape(batch, groups, channels // 2, 2 * time)


def flip(x):
    """Swap channel halves so the next coupling transforms the other half."""
    first, second = x.chunk(2, dim=2)
    return torch.cat([second, first], dim=2)


class FlowStep(nn.Module):
    def __init__(self, n_groups, channels, cfg: FlowConfig):
        super().__init__()
        self.actnorm = ActNorm(n_groups, channels)
        self.coupling = AffineCoupling(n_groups, channels, cfg.width, cfg.n_layers, cfg.kernel_size)

    def forward(self, x_a, x_b):
        """ActNorm, coupling and flip on the channel halves: the flip is a swap of the two, no copy."""
        x_a, x_b, logdet_norm = self.actnorm.forward_halves(x_a, x_b)
        y_b, logdet_coupling = self.coupling.transform(x_a, x_b)
        return y_b, x_a, logdet_norm + logdet_coupling

    def reverse(self, y):
        return self.actnorm.reverse(self.coupling.reverse(flip(y)))


class FlowBlock(nn.Module):
    def __init__(self, n_groups, in_channels, cfg: FlowConfig):
        super().__init__()
        self.steps = nn.ModuleList(FlowStep(n_groups, 2 * in_channels, cfg) for _ in range(cfg.n_flows))

    def forward(self, x):
        # The halves travel apart through the steps and meet once at the end: one concatenation per
        # block instead of two per step (coupling output and flip), the same numbers.
        x_a, x_b = (half.contiguous() for half in squeeze(x).chunk(2, dim=2))
        logdet = 0
        for step in self.steps:
            x_a, x_b, step_logdet = step(x_a, x_b)
            logdet = logdet + step_logdet
        return torch.cat([x_a, x_b], dim=2), logdet

    def reverse(self, y):
        for step in reversed(self.steps):
            y = step.reverse(y)
        return unsqueeze(y)


class FloWaveNet(nn.Module):
    """``n_priors`` independent FloWaveNet priors; ``forward`` maps audio ``[B, G, T]`` to latents."""

    def __init__(self, n_priors: int, cfg: FlowConfig):
        super().__init__()
        self.n_priors = n_priors
        self.cfg = cfg
        self.blocks = nn.ModuleList(FlowBlock(n_priors, 2**b, cfg) for b in range(cfg.n_blocks))

    @property
    def length_multiple(self):
        return 2**self.cfg.n_blocks

    def check_input(self, x):
        if x.dim() != 3 or x.shape[1] != self.n_priors:
            raise ValueError(f"expected audio of shape [batch, {self.n_priors}, time], got {tuple(x.shape)}")
        if x.shape[2] % self.length_multiple:
            raise ValueError(
                f"audio length {x.shape[2]} must be a multiple of 2**n_blocks = {self.length_multiple}; "
                "crop or pad it"
            )

    def forward(self, x):
        """Returns latents ``z`` [B, G, C, T/C] and the total log|det J| per example and prior [B, G]."""
        self.check_input(x)
        z = x.unsqueeze(2)
        # Log-dets accumulate in at least float32, also under mixed precision.
        logdet = torch.zeros(x.shape[:2], device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
        for block in self.blocks:
            z, block_logdet = block(z)
            logdet = logdet + block_logdet
        return z, logdet

    def reverse(self, z):
        for block in reversed(self.blocks):
            z = block.reverse(z)
        return z.squeeze(2)

    def log_prob(self, x, latent_only=False):
        """Full log-likelihood in nats per audio sample, [B, G]: base log-density plus every log-det.

        ``latent_only=True`` drops the log-dets; that is the thesis code's (wrong) quantity, kept
        only to compare with its figures.
        """
        z, logdet = self(x)
        z = z.to(logdet.dtype)
        base = -0.5 * (z * z + LOG_2PI).sum(dim=(2, 3))
        total = base if latent_only else base + logdet
        return total / x.shape[2]

    @torch.no_grad()
    def sample(self, n, length, temperature=1.0, generator=None):
        """``n`` draws [n, G, length] of every prior: base noise at ``temperature`` (from ``generator`` if given),
        then the inverse flow."""
        if length % self.length_multiple:
            raise ValueError(f"sample length must be a multiple of {self.length_multiple}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        channels = self.length_multiple
        weight = next(self.parameters())
        z = temperature * torch.randn(n, self.n_priors, channels, length // channels, generator=generator)
        return self.reverse(z.to(device=weight.device, dtype=weight.dtype))
