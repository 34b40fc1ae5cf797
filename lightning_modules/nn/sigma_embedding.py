"""Embedding of the noise level for a grouped denoiser: c_noise [B, N] -> [B, N, dim, 1].

Random-free Fourier features of c_noise = log(sigma) / 4 (EDM's choice, so that the useful range of
sigma maps to roughly [-2, 1]), then a two-layer MLP per prior (grouped 1x1 convolutions, so each prior
keeps its own weights and the family's parameters stay grouped by prior).
"""
import math

import torch
from torch import nn

from lightning_modules.nn.grouped import GroupedConv1d


class SigmaEmbedding(nn.Module):
    def __init__(self, n_groups, dim, n_frequencies=16):
        super().__init__()
        # Geometric frequencies from 1/8 to 16 cycles per unit of c_noise: coarse and fine detail of log-sigma.
        frequencies = torch.logspace(math.log10(0.125), math.log10(16.0), n_frequencies)
        self.register_buffer("frequencies", frequencies)
        self.hidden = GroupedConv1d(n_groups, 2 * n_frequencies, dim)
        self.out = GroupedConv1d(n_groups, dim, dim)

    def forward(self, c_noise):
        angles = 2 * math.pi * c_noise.float().unsqueeze(-1) * self.frequencies  # [B, N, F]
        features = torch.cat([angles.cos(), angles.sin()], dim=-1).unsqueeze(-1)  # [B, N, 2F, 1]
        return self.out(nn.functional.silu(self.hidden(features)))
