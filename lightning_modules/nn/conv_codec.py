"""Jukebox-style convolutional encoder and decoder of the LQ-VAE (paper 002 section 3).

Encoder: waveform [B, 1, T] -> latents [B, D, T / hop]. Each downsampling stage is a strided convolution
(kernel 2 * stride) followed by a stack of dilated residual blocks (dilations growth^0, growth^1, ...), so
the receptive field grows geometrically; hop = product of the strides. The decoder mirrors it with
transposed convolutions (and the dilations reversed).
"""
from torch import nn


class ResidualStack(nn.Module):
    """``depth`` blocks x + Conv1x1(ReLU(Conv3_dilated(ReLU(x)))), dilation growth^i."""

    def __init__(self, width, depth, growth=3, reverse=False):
        super().__init__()
        dilations = [growth**i for i in range(depth)]
        if reverse:
            dilations = dilations[::-1]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.ReLU(), nn.Conv1d(width, width, 3, padding=d, dilation=d), nn.ReLU(),
                          nn.Conv1d(width, width, 1))
            for d in dilations
        )

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


class Encoder(nn.Module):
    def __init__(self, code_dim, width, strides, depth, growth=3):
        super().__init__()
        layers = [nn.Conv1d(1, width, 3, padding=1)]
        for stride in strides:
            layers += [nn.Conv1d(width, width, 2 * stride, stride=stride, padding=stride // 2),
                       ResidualStack(width, depth, growth)]
        layers.append(nn.Conv1d(width, code_dim, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, code_dim, width, strides, depth, growth=3):
        super().__init__()
        layers = [nn.Conv1d(code_dim, width, 3, padding=1)]
        for stride in reversed(strides):
            layers += [ResidualStack(width, depth, growth, reverse=True),
                       nn.ConvTranspose1d(width, width, 2 * stride, stride=stride, padding=stride // 2)]
        layers.append(nn.Conv1d(width, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)
