"""The network F inside each source's denoiser as a 1-d U-Net (ISDM's shape), grouped over the N sources.

Input ``[B, N, T]`` (channel k belongs to prior k) and c_noise ``[B, N]``; output ``[B, N, T]``. The waveform
is cut into patches of ``patch`` samples (space-to-depth), then each level runs ``blocks`` ResNet blocks and
halves the time resolution by its factor (space-to-depth and a 1x1 conv: a strided conv of kernel = stride).
The lowest ``attention_levels`` levels and the bottleneck add self-attention over time, so the receptive field
of the whole net is the whole crop. The decoder mirrors it: upsampling by a 1x1 conv and depth-to-space, the
encoder's activation added back scaled by 2^-0.5 (ISDM's skips), ``blocks`` ResNet blocks.

A ResNet block is GroupNorm -> SiLU -> conv3 -> GroupNorm -> scale-shift by the sigma embedding -> SiLU ->
conv3, plus its input. Every conv, norm and attention is grouped: each prior has its own weights and never
sees another prior's channels. The output conv starts at zero, so the untrained denoiser is c_skip * x.
"""
import math

from torch import nn

from lightning_modules.nn.denoiser_net import fold, unfold
from lightning_modules.nn.grouped import GroupedConv1d
from lightning_modules.nn.sigma_embedding import SigmaEmbedding

SKIP_SCALE = 2 ** -0.5


def space_to_depth(h, factor):
    """[B, G, C, T] -> [B, G, C * factor, T / factor] (channel c * factor + j holds step j of each block)."""
    batch, groups, channels, time = h.shape
    return h.view(batch, groups, channels, time // factor, factor).transpose(3, 4).reshape(
        batch, groups, channels * factor, time // factor)


def depth_to_space(h, factor):
    batch, groups, channels, time = h.shape
    return h.view(batch, groups, channels // factor, factor, time).transpose(3, 4).reshape(
        batch, groups, channels // factor, time * factor)


class GroupedNorm(nn.Module):
    """GroupNorm of each prior's channels on their own, with each prior's own affine weights."""

    def __init__(self, n_groups, channels, norm_groups=8):
        super().__init__()
        self.norm = nn.GroupNorm(n_groups * math.gcd(norm_groups, channels), n_groups * channels)

    def forward(self, h):
        batch, groups, channels, time = h.shape
        return self.norm(h.reshape(batch, groups * channels, time)).view(batch, groups, channels, time)


class ResBlock(nn.Module):
    def __init__(self, n_groups, in_channels, out_channels, embed_dim):
        super().__init__()
        self.norm_in = GroupedNorm(n_groups, in_channels)
        self.conv_in = GroupedConv1d(n_groups, in_channels, out_channels, kernel_size=3)
        self.norm_out = GroupedNorm(n_groups, out_channels)
        self.scale_shift = GroupedConv1d(n_groups, embed_dim, 2 * out_channels)
        self.conv_out = GroupedConv1d(n_groups, out_channels, out_channels, kernel_size=3)
        self.conv_out.zero_init()  # each block starts as the identity: a deep net trains from the first step
        self.shortcut = None if in_channels == out_channels else GroupedConv1d(n_groups, in_channels, out_channels)

    def forward(self, h, embedding):
        x = self.conv_in(nn.functional.silu(self.norm_in(h)))
        scale, shift = self.scale_shift(embedding).chunk(2, dim=2)
        x = self.conv_out(nn.functional.silu(self.norm_out(x) * (1 + scale) + shift))
        return x + (h if self.shortcut is None else self.shortcut(h))


class GroupedAttention(nn.Module):
    """Multi-head self-attention over time, each prior with its own projections."""

    def __init__(self, n_groups, channels, heads=4):
        super().__init__()
        self.heads = heads if channels % heads == 0 else 1
        self.norm = GroupedNorm(n_groups, channels)
        self.qkv = GroupedConv1d(n_groups, channels, 3 * channels)
        self.out = GroupedConv1d(n_groups, channels, channels)
        self.out.zero_init()

    def forward(self, h):
        batch, groups, channels, time = h.shape
        q, k, v = self.qkv(self.norm(h)).view(batch * groups, 3, self.heads, channels // self.heads, time).unbind(1)
        attended = nn.functional.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3))
        return h + self.out(attended.transpose(2, 3).reshape(batch, groups, channels, time))


class Level(nn.Module):
    """``blocks`` ResNet blocks (each followed by attention when ``attention``) at one resolution."""

    def __init__(self, n_groups, in_channels, channels, blocks, embed_dim, attention):
        super().__init__()
        self.blocks = nn.ModuleList(
            ResBlock(n_groups, in_channels if i == 0 else channels, channels, embed_dim) for i in range(blocks))
        self.attention = nn.ModuleList(GroupedAttention(n_groups, channels) for _ in range(blocks if attention else 0))

    def forward(self, h, embedding):
        for i, block in enumerate(self.blocks):
            h = block(h, embedding)
            if self.attention:
                h = self.attention[i](h)
        return h


class UNetDenoiser(nn.Module):
    """F for a grouped denoiser; ``widths`` has one entry per level plus the bottleneck's (len(factors) + 1)."""

    def __init__(self, n_groups, widths=(32, 64, 96), factors=(4, 4), patch=4, blocks=2, attention_levels=1,
                 embed_dim=64):
        super().__init__()
        if len(widths) != len(factors) + 1:
            raise ValueError(f"a U-Net needs one width per level and one for the bottleneck: {len(factors) + 1} "
                             f"widths for factors {list(factors)}, got {list(widths)}")
        self.patch, self.factors = patch, list(factors)
        self.length_multiple = patch * math.prod(factors)
        self.embedding = SigmaEmbedding(n_groups, embed_dim)
        self.start = GroupedConv1d(n_groups, patch, widths[0], kernel_size=3)
        n_levels = len(factors)
        attend = [i >= n_levels - attention_levels for i in range(n_levels)]
        self.down_levels = nn.ModuleList(
            Level(n_groups, widths[i], widths[i], blocks, embed_dim, attend[i]) for i in range(n_levels))
        self.down = nn.ModuleList(
            GroupedConv1d(n_groups, widths[i] * f, widths[i + 1]) for i, f in enumerate(factors))
        self.middle = Level(n_groups, widths[-1], widths[-1], 2, embed_dim, attention_levels > 0)
        self.up = nn.ModuleList(
            GroupedConv1d(n_groups, widths[i + 1], widths[i] * f) for i, f in enumerate(factors))
        self.up_levels = nn.ModuleList(
            Level(n_groups, widths[i], widths[i], blocks, embed_dim, attend[i]) for i in range(n_levels))
        self.end_norm = GroupedNorm(n_groups, widths[0])
        self.end = GroupedConv1d(n_groups, widths[0], patch, kernel_size=3)
        self.end.zero_init()

    def forward(self, x, c_noise):
        if x.shape[-1] % self.length_multiple:
            raise ValueError(f"audio length {x.shape[-1]} must be a multiple of the U-Net's "
                             f"patch x factors = {self.length_multiple}")
        embedding = self.embedding(c_noise).to(x.dtype)
        h = self.start(fold(x, self.patch))
        skips = []
        for level, down, factor in zip(self.down_levels, self.down, self.factors):
            h = level(h, embedding)
            skips.append(h)
            h = down(space_to_depth(h, factor))
        h = self.middle(h, embedding)
        for i in reversed(range(len(self.factors))):
            h = (depth_to_space(self.up[i](h), self.factors[i]) + skips[i]) * SKIP_SCALE
            h = self.up_levels[i](h, embedding)
        return unfold(self.end(nn.functional.silu(self.end_norm(h))))
