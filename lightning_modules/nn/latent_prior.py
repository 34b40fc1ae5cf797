"""The LQ-VAE prior family (paper 002): one frozen LQ-VAE shared by every source and one autoregressive
Transformer per source over its code indices.

    log_prob(x [B, N, T]) -> [B, N] = log p_k(codes of x_k) / T

in nats per AUDIO sample, of the LATENT CODES: a discrete probability of the code sequence the LQ-VAE
assigns to x (like the mu-law WaveNet's), not a density of the waveform, and not differentiable in x.
Every table that shows it says "latent codes". Sequences longer than the Transformer context are scored
in consecutive windows of ``context`` codes, each window from the start token (its first codes see no
earlier past: a slightly lower likelihood than a longer context would give).

The LQ-VAE is trained first (stage 1, lightning_modules/lqvae_module.py), then frozen: its parameters do
not train here (``requires_grad`` False, no EMA updates) and are saved in the family's checkpoint, so a
stage-2 checkpoint alone reproduces every likelihood and sample.
"""
from dataclasses import dataclass, fields

import torch
from torch import nn

from lightning_modules.nn.latent_transformer import GroupedTransformer, TransformerConfig
from lightning_modules.nn.lqvae import LQVAE, LQVAEConfig


@dataclass
class LatentPriorConfig(LQVAEConfig):
    # The per-source Transformers (lightning_modules/nn/latent_transformer.py); vocabulary = codebook_size.
    width: int = 128
    n_layers: int = 2
    n_heads: int = 4
    context: int = 256  # codes attended over
    dropout: float = 0.0


def lqvae_config(cfg):
    return LQVAEConfig(**{f.name: getattr(cfg, f.name) for f in fields(LQVAEConfig)})


class LatentPrior(nn.Module):
    has_density_gradient = False  # log_prob is a probability of discrete codes: no gradient in x
    discrete_likelihood = True  # ... and not a waveform density (no complexity-corrected score)
    likelihood_method = ("latent codes: log p_k(LQ-VAE codes of x) under source k's Transformer, nats per audio "
                         "sample (a discrete probability, not a waveform density)")

    def __init__(self, n_sources, cfg: LatentPriorConfig):
        super().__init__()
        self.n_sources, self.cfg = n_sources, cfg
        self.lqvae = LQVAE(lqvae_config(cfg)).requires_grad_(False)
        self.transformer = GroupedTransformer(n_sources, TransformerConfig(
            vocab_size=cfg.codebook_size, context=cfg.context, width=cfg.width, n_layers=cfg.n_layers,
            n_heads=cfg.n_heads, dropout=cfg.dropout))

    def train(self, mode=True):
        super().train(mode)
        self.lqvae.eval()  # frozen: never in training mode
        return self

    def load_lqvae(self, state_dict):
        """Weights of a stage-1 LQ-VAE (its own state dict, keys without the ``lqvae.`` prefix)."""
        self.lqvae.load_state_dict(state_dict)

    @torch.no_grad()
    def codes(self, x):
        """x [B, N, T] -> code indices [B, N, T / hop] (each channel through the shared LQ-VAE)."""
        batch, n, length = x.shape
        return self.lqvae.codes(x.reshape(batch * n, length).float()).view(batch, n, -1)

    def code_log_prob(self, codes):
        """Sum of log p_k(z_s | past) over windows of ``context`` codes: [B, N, S] -> [B, N]."""
        windows = codes.split(self.cfg.context, dim=2)
        return sum(self.transformer.log_prob_codes(window) for window in windows)

    def log_prob(self, x):
        """[B, N, T] -> [B, N], nats per audio sample of the latent codes (see the module docstring)."""
        return self.code_log_prob(self.codes(x)) / x.shape[-1]

    @torch.no_grad()
    def sample(self, n_examples, length, generator=None, temperature=1.0):
        """Ancestral sampling of ``length`` audio samples per source (a multiple of the hop, at most
        context * hop), then decoding: -> [n_examples, N, length]."""
        self.lqvae.check_length(torch.empty(length))
        n_codes = length // self.lqvae.hop
        codes = self.transformer.sample(n_examples, n_codes, generator=generator, temperature=temperature)
        audio = self.lqvae.decode_indices(codes.reshape(n_examples * self.n_sources, n_codes))
        return audio.view(n_examples, self.n_sources, length)

