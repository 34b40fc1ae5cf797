"""Activation normalisation (Glow) with data-dependent initialisation, per prior and channel."""
import torch
import torch.distributed as dist
from torch import nn


class ActNorm(nn.Module):
    """``y = (x + loc) * exp(log_scale)``; the first training batch sets loc/log_scale so y has
    zero mean and unit variance per channel. Under DDP the statistics are averaged over ranks so
    every replica starts from the same parameters."""

    def __init__(self, n_groups, channels):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(n_groups, channels, 1))
        self.log_scale = nn.Parameter(torch.zeros(n_groups, channels, 1))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x):
        x = x.float()
        moments = torch.stack([x.mean(dim=(0, 3)), (x * x).mean(dim=(0, 3))])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(moments)
            moments /= dist.get_world_size()
        mean, second = moments
        std = (second - mean * mean).clamp_min(0).sqrt()
        self.loc.copy_(-mean.unsqueeze(-1))
        self.log_scale.copy_(-torch.log(std + 1e-6).unsqueeze(-1))
        self.initialized.fill_(True)

    def forward(self, x):
        if not bool(self.initialized) and self.training:
            self.initialize(x)
        return (x + self.loc) * torch.exp(self.log_scale), self.log_det(x)

    def forward_halves(self, x_a, x_b):
        """``forward`` on the two channel halves of x, kept apart (FlowBlock avoids concatenating them)."""
        if not bool(self.initialized) and self.training:
            self.initialize(torch.cat([x_a, x_b], dim=2))
        loc_a, loc_b = self.loc.chunk(2, dim=1)
        scale_a, scale_b = torch.exp(self.log_scale).chunk(2, dim=1)
        return (x_a + loc_a) * scale_a, (x_b + loc_b) * scale_b, self.log_det(x_a)

    def log_det(self, x):
        """[B, G]: T * sum(log_scale) per prior, the same for every example of x [B, G, C, T]."""
        return (x.shape[3] * self.log_scale.sum(dim=(1, 2))).expand(x.shape[0], -1)

    def reverse(self, y):
        return y * torch.exp(-self.log_scale) - self.loc
