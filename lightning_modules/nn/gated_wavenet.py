"""Gated residual layers (shared with the causal WaveNet prior) and the non-causal gated WaveNet
used inside each affine coupling (FloWaveNet) to predict log s and t."""
import math

import torch
from torch import nn

from lightning_modules.nn.gated_activation import gated_tanh_sigmoid
from lightning_modules.nn.grouped import GroupedConv1d


class GatedResidualLayer(nn.Module):
    """Dilated conv -> tanh * sigmoid gate -> residual and skip 1x1 convs.

    The last layer of a stack has no residual conv: only its skip output is used, and a parameter
    outside the loss's graph makes DDP training stop with an error.
    """

    def __init__(self, n_groups, width, kernel_size, dilation, causal=False, last=False):
        super().__init__()
        self.dilated = GroupedConv1d(n_groups, width, 2 * width, kernel_size, dilation, causal)
        self.residual = None if last else GroupedConv1d(n_groups, width, width)
        self.skip = GroupedConv1d(n_groups, width, width)
        if last:
            self._register_load_state_dict_pre_hook(drop_unused_residual)

    def forward(self, h, past=None):
        return residual_and_skip(self, h, gated_tanh_sigmoid(self.dilated(h, past)))


def residual_and_skip(layer, h, gated):
    """The residual stream's next value and the skip output of ``layer`` (its ``residual`` and ``skip``
    1x1 convs, ``residual`` None on a stack's last layer) for the gated activations."""
    if layer.residual is None:
        return h, layer.skip(gated)
    residual, skip = layer.residual(gated), layer.skip(gated)
    # sqrt(0.5) keeps the residual stream's variance from growing with depth (scaled in place: the sum
    # is a fresh tensor that nothing saves for backward).
    return torch.add(h, residual).mul_(math.sqrt(0.5)), skip


class SkipSum:
    """Running sum of a stack's skip outputs, accumulated in place after the first addition (never into
    a layer's own output, which autograd may still need)."""

    def __init__(self):
        self.total, self.owned = None, False

    def add(self, skip):
        if self.total is None:
            self.total = skip
        elif self.owned:
            self.total.add_(skip)
        else:
            self.total, self.owned = self.total + skip, True
        return self


def drop_unused_residual(state_dict, prefix, *args):
    """Checkpoints written before the last layer lost its residual conv still load: that conv never
    reached the output, so dropping its weights changes nothing."""
    for key in [k for k in state_dict if k.startswith(prefix + "residual.")]:
        del state_dict[key]


class GatedWaveNet(nn.Module):
    """Stack of gated residual layers with dilations 2^i, skip sum, then ReLU-1x1-ReLU-1x1.

    The last 1x1 conv is zero-initialised, so an affine coupling built on it starts as identity.
    """

    def __init__(self, n_groups, in_channels, out_channels, width, n_layers, kernel_size=3, causal=False):
        super().__init__()
        self.start = GroupedConv1d(n_groups, in_channels, width)
        self.layers = nn.ModuleList(
            GatedResidualLayer(n_groups, width, kernel_size, 2**i, causal, last=i == n_layers - 1)
            for i in range(n_layers)
        )
        self.end_hidden = GroupedConv1d(n_groups, width, width)
        self.end_out = GroupedConv1d(n_groups, width, out_channels)
        self.end_out.zero_init()

    def forward(self, x):
        h = self.start(x)
        skips = SkipSum()
        for layer in self.layers:
            h, skip = layer(h)
            skips.add(skip)
        return self.end_out(torch.relu(self.end_hidden(torch.relu(skips.total))))
