"""Grouped 1-d convolution over a ``[B, G, C, T]`` tensor: G independent convolutions in one call.

How it runs is chosen per device by measuring whole models (``make bench-compare``, docs/speed.md),
not single layers, whose timings did not carry over to the model:

* CPU, kernel 1: one batched matmul ``bias + W[G] @ x[B, G]`` (MKL ``baddbmm``, the bias added inside
  the product), faster forward and backward than oneDNN's grouped 1x1 convolution;
* CPU, kernel > 1: one grouped ``conv1d``, centred padding given to the convolution itself (no padded
  copy of the input); causal padding by an explicit left pad;
* CUDA: one grouped ``conv1d`` (cuDNN) for both.

The weights are an ``nn.Conv1d``'s in every case, so checkpoints do not depend on the path.
"""
import os

import torch
from torch import nn

# For A/B measurements only: GS_CONV_PATH=conv forces the convolution path on CPU too.
FORCED_PATH = os.environ.get("GS_CONV_PATH", "")


def use_matmul(x, kernel_size):
    return kernel_size == 1 and not x.is_cuda and FORCED_PATH != "conv"


def grouped_matmul(weight, bias, x):
    """``bias[g] + weight[g] @ x[b, g]`` for weight [G, O, C], bias [G, O, 1], x [B, G, C, T] -> [B, G, O, T]."""
    batch, groups, channels, time = x.shape
    out_channels = weight.shape[1]
    out = torch.baddbmm(bias.expand(batch, -1, -1, -1).reshape(batch * groups, out_channels, 1),
                        weight.expand(batch, -1, -1, -1).reshape(batch * groups, out_channels, channels),
                        x.reshape(batch * groups, channels, time))
    return out.view(batch, groups, out_channels, time)


class GroupedConv1d(nn.Module):
    """G independent ``Conv1d(in_channels, out_channels)``, one per prior."""

    def __init__(self, n_groups, in_channels, out_channels, kernel_size=1, dilation=1, causal=False):
        super().__init__()
        self.n_groups = n_groups
        self.out_channels = out_channels
        total_pad = dilation * (kernel_size - 1)
        # Non-causal: centred receptive field. Causal: pad only on the left.
        self.context = total_pad
        self.pad = (total_pad, 0) if causal else (total_pad // 2, total_pad - total_pad // 2)
        self.conv = nn.Conv1d(
            n_groups * in_channels, n_groups * out_channels, kernel_size, dilation=dilation, groups=n_groups
        )

    def forward(self, x, past=None):
        """``past`` [B, G, C, receptive - 1]: left context for a causal conv (cached generation);
        without it the context is zero padding. The output has the time length of ``x``."""
        batch, groups, channels, time = x.shape
        if use_matmul(x, self.conv.kernel_size[0]):
            return grouped_matmul(self.conv.weight.view(groups, self.out_channels, channels),
                                  self.conv.bias.view(groups, self.out_channels, 1), x)
        if past is None and self.pad[0] == self.pad[1]:
            out = nn.functional.conv1d(x.reshape(batch, groups * channels, time), self.conv.weight, self.conv.bias,
                                       dilation=self.conv.dilation, padding=self.pad[0], groups=groups)
            return out.view(batch, groups, self.out_channels, time)
        if past is None:
            h = nn.functional.pad(x.reshape(batch, groups * channels, time), self.pad)
        else:
            h = torch.cat([past, x], dim=3).reshape(batch, groups * channels, -1)
        return self.conv(h).view(batch, groups, self.out_channels, time)

    def zero_init(self):
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
