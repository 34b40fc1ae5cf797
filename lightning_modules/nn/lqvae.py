"""The LQ-VAE (paper 002 section 3-4.2): one VQ-VAE shared by every source, trained with the
linearisation loss that makes sums of codes behave like sums of signals.

    encode:   x [B, T] -> latents h = E(x) [B, D, S], S = T / hop
    quantise: B_Q(h), indices z = B_I(B_Q(h)) [B, S]
    decode:   codes [B, D, S] -> x^ [B, T]

Loss (paper eq. 1 and 7), every term a mean over elements:
    reconstruction MSE + spectral_weight * multi-resolution STFT + beta * commit + lin_weight * L_lin
with the codebook term replaced by EMA updates (vector_quantizer.py) and

    L_lin = mean || B_Q(w B_Q(E(x1)) + ... + w B_Q(E(xL))) - B_Q(E(w x1 + ... + w xL)) ||^2     (eq. 8-10)

for groups of L crops from different sources, w = 1/L for mean-mixed data (the toy data) and w = 1 for
sum-mixed data (musdb18, Slakh2100 stems): the weights are the dataset's mixing, so the code of a mixture
is the quantised mixing of the sources' codes. Paper 002 uses pairs (L = 2, w = 1/2); a model meant to
separate N sources is trained on N-tuples (model.lin_sources), since a mean of four sources at a quarter
amplitude each is not what pairs at half amplitude teach. Gradients cross B_Q straight through.
The codebook's EMA follows the latents of the single-source crops and of their mixtures (two EMA steps per
training step), so the codebook also holds codes for mixtures: latent-domain separation quantises the
mixture with it.
"""
from dataclasses import dataclass, field
from math import prod
from typing import List, Optional

import torch
from torch import nn

from lightning_modules.nn.conv_codec import Decoder, Encoder
from lightning_modules.nn.spectral_loss import multi_resolution_stft_loss
from lightning_modules.nn.vector_quantizer import VectorQuantizer

LIN_MIXINGS = ("mean", "sum")


def mix_weight(mixing, n_sources):
    """The weight of each of ``n_sources`` sources in the experiment's mix: 1/n for the mean (1/2 for a
    pair, paper 002's form), 1 for the sum."""
    return 1.0 / n_sources if mixing == "mean" else 1.0


def weighted_sum(values, members, weight):
    """sum_j weight * values[members[j]], added left to right; a member None is ``values`` itself. A pair
    (None, partner) is then exactly w v + w v[partner], paper 002's formula, graph and rounding included."""
    total = None
    for index in members:
        term = weight * (values if index is None else values[index])
        total = term if total is None else total + term
    return total


@dataclass
class LQVAEConfig:
    codebook_size: int = 256
    code_dim: int = 16
    vq_width: int = 64  # channels of the encoder and decoder
    strides: List[int] = field(default_factory=lambda: [2, 2, 2, 2])  # hop = product
    res_depth: int = 3  # dilated residual blocks after each down/upsampling
    dilation_growth: int = 3
    ema_decay: float = 0.99
    restart_threshold: float = 1.0
    # Commitment weight. A first toy run with Jukebox's 0.02 (64-dim codes, spectral weight 1) saw the commit loss
    # grow to 5-12 and 3.9 dB SI-SDR at 1000 steps; 16-dim codes with 0.25 (no spectral term) reached
    # 9.5-16.5 dB by 500.
    beta: float = 0.25
    lin_weight: float = 1.0  # linearisation loss weight (0 = a plain VQ-VAE)
    lin_mixing: str = "mean"  # mean | sum: the experiment's mixing (set from the dataset by the trainer)
    # Sources mixed in each linearisation group: None = every source of the run (lqvae_module.py), 2 = pairs
    lin_sources: Optional[int] = None
    # Off by default: on the toy data a weight of 0.1 held reconstruction to 3.2-10.6 dB SI-SDR after 500 steps,
    # against 9.5-16.5 dB without it (the log-magnitude term is dominated by near-empty bins of pure tones).
    spectral_weight: float = 0.0
    fft_sizes: List[int] = field(default_factory=lambda: [64, 256, 1024])

    def __post_init__(self):
        if any(int(s) < 2 or int(s) % 2 for s in self.strides):
            raise ValueError(f"LQ-VAE strides must be even integers >= 2, got {list(self.strides)}")
        if self.lin_mixing not in LIN_MIXINGS:
            raise ValueError(f"lin_mixing must be one of {list(LIN_MIXINGS)}, got {self.lin_mixing!r}")
        if self.lin_sources is not None and int(self.lin_sources) < 2:
            raise ValueError(f"model.lin_sources must be >= 2 (sources mixed per linearisation group), "
                             f"got {self.lin_sources}")
        if self.codebook_size < 2 or self.code_dim < 1:
            raise ValueError("codebook_size must be >= 2 and code_dim >= 1")

    @property
    def hop(self):
        return prod(int(s) for s in self.strides)


class LQVAE(nn.Module):
    def __init__(self, cfg: LQVAEConfig):
        super().__init__()
        self.cfg = cfg
        strides = [int(s) for s in cfg.strides]
        self.encoder = Encoder(cfg.code_dim, cfg.vq_width, strides, cfg.res_depth, cfg.dilation_growth)
        self.decoder = Decoder(cfg.code_dim, cfg.vq_width, strides, cfg.res_depth, cfg.dilation_growth)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.code_dim, cfg.ema_decay,
                                         restart_threshold=cfg.restart_threshold)

    @property
    def hop(self):
        return self.cfg.hop

    def check_length(self, x):
        if x.shape[-1] % self.hop:
            raise ValueError(f"the LQ-VAE needs a length that is a multiple of its hop {self.hop} samples; "
                             f"got {x.shape[-1]} (crop or pad the audio)")

    def encode(self, x):
        """x [B, T] -> latents [B, D, T / hop] (before quantisation)."""
        self.check_length(x)
        return self.encoder(x.unsqueeze(1))

    def decode(self, codes):
        """Quantised latents [B, D, S] -> waveform [B, S * hop]."""
        return self.decoder(codes).squeeze(1)

    @torch.no_grad()
    def codes(self, x):
        """Code indices z = B_I(B_Q(E(x))): [B, T] -> [B, S]."""
        return self.quantizer.nearest(self.encode(x).transpose(1, 2))

    @torch.no_grad()
    def decode_indices(self, indices):
        """[B, S] -> waveform [B, S * hop]."""
        return self.decode(self.quantizer.lookup(indices).transpose(1, 2))

    def linearisation(self, x, partner, quantised=None, update=False):
        """(QL, LQ, indices of QL, indices of LQ) for groups of crops x [B, T] mixed with the experiment's
        weights (eq. 9-10), with straight-through gradients. ``partner`` [B]: the pairs (x[i], x[partner[i]]);
        [G, L]: G groups of L crop indices each. ``quantised``: B_Q(E(x)) when already computed."""
        members = [None, partner] if partner.dim() == 1 else list(partner.unbind(1))
        weight = mix_weight(self.cfg.lin_mixing, len(members))
        if quantised is None:
            quantised, _, _ = self.quantizer(self.encode(x))
        ql, ql_indices, _ = self.quantizer(weighted_sum(quantised, members, weight))
        lq, lq_indices, _ = self.quantizer(self.encode(weighted_sum(x, members, weight)), update=update)
        return ql, lq, ql_indices, lq_indices

    def losses(self, x, partner, update=False):
        """The training terms for single-source crops x [B, T], each paired with the crop x[partner[i]] of
        another source (``partner`` [B]), or mixed in groups of crops of different sources (``partner`` [G, L]). ``update`` applies the codebook's EMA step (training). Returns a dict of scalars with
        "loss" the weighted total; "lin" is computed (and reported) even when lin_weight is 0, without
        gradient then."""
        cfg = self.cfg
        latents = self.encode(x)
        quantised, indices, commit = self.quantizer(latents, update=update)
        reconstruction = self.decode(quantised)
        mse = (reconstruction - x).pow(2).mean()
        spectral = (multi_resolution_stft_loss(reconstruction, x, cfg.fft_sizes).mean() if cfg.spectral_weight > 0
                    else mse.new_zeros(()))
        with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.lin_weight > 0):
            ql, lq, _, _ = self.linearisation(x, partner, quantised, update=update)
            lin = (lq - ql).pow(2).mean()
        loss = mse + cfg.spectral_weight * spectral + cfg.beta * commit + cfg.lin_weight * lin
        return {"loss": loss, "mse": mse, "spectral": spectral, "commit": commit, "lin": lin,
                "indices": indices, "reconstruction": reconstruction}
