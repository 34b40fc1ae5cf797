"""The network F inside each source's denoiser: a non-causal dilated residual conv net conditioned on sigma.

Input ``[B, N, T]`` (channel k belongs to prior k) and c_noise ``[B, N]``; output ``[B, N, T]``. The
waveform is first folded ``squeeze`` samples per step (space-to-depth, as FloWaveNet's squeeze): the
layers run at T / squeeze steps, which divides their cost by ``squeeze`` and multiplies the receptive
field in samples by it. Each layer is dilated conv -> + sigma embedding -> tanh * sigmoid gate ->
residual and skip 1x1 convs (WaveNet's layer with a global condition). The output conv starts at zero,
so the untrained denoiser is c_skip * x: the best linear guess.
"""
import math

import torch
from torch import nn

from lightning_modules.nn.gated_activation import gated_tanh_sigmoid
from lightning_modules.nn.gated_wavenet import SkipSum, residual_and_skip
from lightning_modules.nn.grouped import GroupedConv1d
from lightning_modules.nn.sigma_embedding import SigmaEmbedding


def fold(x, factor):
    """[B, N, T] -> [B, N, factor, T / factor]: channel j holds samples j, j + factor, ..."""
    batch, groups, time = x.shape
    return x.view(batch, groups, time // factor, factor).transpose(2, 3)


def unfold(h):
    batch, groups, factor, steps = h.shape
    return h.transpose(2, 3).reshape(batch, groups, factor * steps)


class ConditionedLayer(nn.Module):
    def __init__(self, n_groups, width, kernel_size, dilation, embed_dim, last=False):
        super().__init__()
        self.dilated = GroupedConv1d(n_groups, width, 2 * width, kernel_size, dilation)
        self.condition = GroupedConv1d(n_groups, embed_dim, 2 * width)
        # The last layer's residual output would reach no loss (and DDP rejects unused parameters).
        self.residual = None if last else GroupedConv1d(n_groups, width, width)
        self.skip = GroupedConv1d(n_groups, width, width)

    def forward(self, h, embedding):
        return residual_and_skip(self, h, gated_tanh_sigmoid(self.dilated(h) + self.condition(embedding)))


class DenoiserNet(nn.Module):
    def __init__(self, n_groups, width=32, n_layers=10, kernel_size=3, squeeze=4, dilation_cycle=10, embed_dim=64):
        super().__init__()
        self.squeeze = squeeze
        self.embedding = SigmaEmbedding(n_groups, embed_dim)
        self.start = GroupedConv1d(n_groups, squeeze, width)
        self.layers = nn.ModuleList(
            ConditionedLayer(n_groups, width, kernel_size, 2 ** (i % dilation_cycle), embed_dim, last=i == n_layers - 1)
            for i in range(n_layers)
        )
        self.end_hidden = GroupedConv1d(n_groups, width, width)
        self.end_out = GroupedConv1d(n_groups, width, squeeze)
        self.end_out.zero_init()

    def forward(self, x, c_noise):
        embedding = self.embedding(c_noise).to(x.dtype)
        h = self.start(fold(x, self.squeeze))
        skips = SkipSum()
        for layer in self.layers:
            h, skip = layer(h, embedding)
            skips.add(skip)
        out = self.end_out(torch.relu(self.end_hidden(torch.relu(skips.total * math.sqrt(1 / len(self.layers))))))
        return unfold(out)
