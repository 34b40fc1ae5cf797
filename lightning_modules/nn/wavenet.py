"""Autoregressive WaveNet prior (van den Oord et al. 2016; paper 003 section 2, App. 5.2).

Causal dilated gated convolutions with residual and skip connections; dilations 1, 2, ..., 2^(n_layers-1)
repeated over ``n_blocks`` blocks; a 256-way softmax per time step. The ``n_priors`` priors share one
module through grouped convolutions and are fully independent.

Two likelihoods, chosen by ``likelihood`` (every number we report says which one it uses):

* ``"mulaw"`` (paper 003's numbers): the next sample's mu-law class, categorical; ``log_prob`` is the
  mean categorical log-probability per sample (a discrete probability, so always <= 0). Not
  differentiable in the scored sample itself, only through the conditioning past.
* ``"smoothed"`` (for Langevin, Jayaram & Thickstun 2021): K linear bins with centres c_k in [-1, 1] and
  the density ``p(x_t | past) = sum_k softmax_k * N(x_t; c_k, s^2 + sigma^2)``, a proper continuous
  density, differentiable in every sample. ``s`` is ``smoothing_sigma`` (0 = one bin width,
  2 / (K - 1)); ``sigma`` is ``noise_sigma``, the noise the prior was fine-tuned at (``PriorModule``
  sets it; 0 = noiseless). Then ``x_t = c_k + s * eps1 + sigma * eps2``: the categorical predicts the
  *clean* sample's bin from the *noisy* past, and the density is exactly that of a clean bin-valued
  source plus N(0, sigma^2), so it covers the noisy range, as the smoothing at the noise level of
  Jayaram & Thickstun does. With width ``s`` alone, the third of x + N(0, 0.359^2) that lies outside
  [-1, 1] would cost hundreds of nats per sample, and a Langevin step, stable only for
  ``eta < 2 * width^2``, would diverge at BASIS's large levels. Sampling draws with the same width.

In both the network reads the previous samples as continuous values (mu-law companded for
``"mulaw"``), never one-hot classes, so gradients flow to the waveform.
"""
import math
from dataclasses import dataclass

import torch
from torch import nn

from lightning_modules.nn.gated_wavenet import GatedResidualLayer, SkipSum
from lightning_modules.nn.grouped import GroupedConv1d
from lightning_modules.nn.mu_law import mu_law_compand, mu_law_decode, mu_law_encode

LIKELIHOODS = ("mulaw", "smoothed")


@dataclass
class WaveNetConfig:
    n_blocks: int = 3
    n_layers: int = 10
    width: int = 256
    kernel_size: int = 3
    n_classes: int = 256
    likelihood: str = "mulaw"
    smoothing_sigma: float = 0.0


class WaveNet(nn.Module):
    def __init__(self, n_priors: int, cfg: WaveNetConfig):
        super().__init__()
        if cfg.likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown WaveNet likelihood {cfg.likelihood!r}; choose from {list(LIKELIHOODS)}")
        self.n_priors, self.cfg = n_priors, cfg
        groups, width = n_priors, cfg.width
        self.start = GroupedConv1d(groups, 1, width)
        self.layers = nn.ModuleList(
            GatedResidualLayer(groups, width, cfg.kernel_size, 2 ** (i % cfg.n_layers), causal=True,
                               last=i == cfg.n_blocks * cfg.n_layers - 1)
            for i in range(cfg.n_blocks * cfg.n_layers)
        )
        self.end_hidden = GroupedConv1d(groups, width, width)
        self.end_out = GroupedConv1d(groups, width, cfg.n_classes)
        self.register_buffer("centres", torch.linspace(-1.0, 1.0, cfg.n_classes))
        # A plain float, not a buffer: the state_dict stays as it was, so older checkpoints still load.
        self.noise_sigma = 0.0

    @property
    def has_density_gradient(self):
        """Whether grad_x log_prob is the gradient of a density (what Langevin separation needs)."""
        return self.cfg.likelihood != "mulaw"

    @property
    def discrete_likelihood(self):
        """Whether log_prob is a probability of discrete classes (mu-law), not a waveform density."""
        return self.cfg.likelihood == "mulaw"

    @property
    def smoothing_sigma(self):
        return self.cfg.smoothing_sigma or 2.0 / (self.cfg.n_classes - 1)

    @property
    def component_sigma(self):
        """Width of each smoothed component: the bin smoothing ``s`` and the fine-tuning noise together."""
        return math.sqrt(self.smoothing_sigma**2 + float(self.noise_sigma) ** 2)

    @property
    def receptive_field(self):
        return 1 + sum(layer.dilated.context for layer in self.layers)

    def network_input(self, x):
        return mu_law_compand(x, self.cfg.n_classes - 1) if self.cfg.likelihood == "mulaw" else x

    def network(self, inputs, caches=None):
        """inputs [B, G, T] (already companded) -> logits [B, G, K, T]; ``logits[..., t]`` depends on
        ``inputs[..., :t+1]`` only. ``caches`` (list, one per layer) holds each layer's left context and
        is updated in place, for step-by-step generation."""
        h = self.start(inputs.unsqueeze(2))
        skips = SkipSum()
        for i, layer in enumerate(self.layers):
            past = None if caches is None else caches[i]
            if caches is not None:
                caches[i] = torch.cat([past, h], dim=3)[..., h.shape[3]:]
            h, skip = layer(h, past)
            skips.add(skip)
        return self.end_out(torch.relu(self.end_hidden(torch.relu(skips.total))))

    def logits(self, x):
        """Logits of p(x_t | x_<t) for every t: the input is shifted right by one sample."""
        if x.dim() != 3 or x.shape[1] != self.n_priors:
            raise ValueError(f"expected audio of shape [batch, {self.n_priors}, time], got {tuple(x.shape)}")
        inputs = nn.functional.pad(self.network_input(x), (1, 0))[..., :-1]
        return self.network(inputs)

    def log_prob(self, x):
        """Mean log-likelihood per audio sample, [B, G] (see the module docstring for the variants)."""
        # log softmax_k = logit_k - logsumexp(logits), written out so the [B, G, K, T] log-probabilities
        # are never materialised (nor their backward's full-size zero-filled gradient).
        logits = self.logits(x).float()  # [B, G, K, T]
        normaliser = torch.logsumexp(logits, dim=2)
        if self.cfg.likelihood == "mulaw":
            target = mu_law_encode(x, self.cfg.n_classes - 1).unsqueeze(2)
            return (logits.gather(2, target).squeeze(2) - normaliser).mean(dim=2)
        sigma = self.component_sigma
        centres = self.centres.view(1, 1, -1, 1)
        log_normal = -0.5 * ((x.unsqueeze(2).float() - centres) / sigma) ** 2 - math.log(sigma * math.sqrt(2 * math.pi))
        return (torch.logsumexp(logits + log_normal, dim=2) - normaliser).mean(dim=2)

    def class_to_value(self, index, generator=None):
        if self.cfg.likelihood == "mulaw":
            return mu_law_decode(index, self.cfg.n_classes - 1).to(self.centres.dtype)
        noise = torch.randn(index.shape, generator=generator, device=index.device, dtype=self.centres.dtype)
        return self.centres[index] + self.component_sigma * noise

    def empty_caches(self, batch_size):
        device, dtype = self.centres.device, self.centres.dtype
        return [torch.zeros(batch_size, self.n_priors, self.cfg.width, layer.dilated.context, device=device, dtype=dtype)
                for layer in self.layers]

    @torch.no_grad()
    def sample(self, n, length, cached=True, temperature=1.0, generator=None):
        """Ancestral sampling, [n, G, length]. ``cached=True`` keeps each layer's queue of past
        activations (O(T)); ``cached=False`` recomputes the whole past at every step (O(T^2))."""
        caches = self.empty_caches(n) if cached else None
        # The shifted-in zero, in the model's dtype (a float64 model takes no float32 input).
        previous = torch.zeros(n, self.n_priors, 1, device=self.centres.device, dtype=self.centres.dtype)
        history, samples = [], []
        for _ in range(length):
            if cached:
                logits = self.network(previous, caches)[..., -1]
            else:
                history.append(previous)
                logits = self.network(torch.cat(history, dim=2))[..., -1]
            probs = torch.softmax(logits.float() / temperature, dim=2)
            index = torch.multinomial(probs.view(-1, probs.shape[2]), 1, generator=generator).view(n, self.n_priors)
            value = self.class_to_value(index, generator)
            samples.append(value)
            previous = self.network_input(value).unsqueeze(2)
        return torch.stack(samples, dim=2)
