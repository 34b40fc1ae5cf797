"""The posterior mean under stationary Gaussian priors (``separation.algorithm=template``): the control a
separator with learnt priors should beat, besides Average.

Each class is a stationary Gaussian process whose power spectrum P_k is the mean over its solo training crops
(``class_power_spectra``). With STFT bins taken as independent, the posterior mean of the sources given the
mixture is a Wiener filter with fixed masks:

    mask_k(f) = alpha_k^2 P_k(f) / sum_j alpha_j^2 P_j(f),   alpha_k y_k = ISTFT(mask_k STFT(m))

So the estimates sum to m exactly and differ from Average only by each class's spectral envelope: no priors to
train, no iterations. On the demo Slakh pairs such a control beat both Average and the latent posterior
(docs/real_music.md); with it as a row, a separator is judged against what the class spectra alone give.
The same Gaussian model scores samples for selection (``log_prob``: Whittle's likelihood per sample).
"""
import math

import torch
from torch import nn

from lightning_modules.samplers.wiener_filter import share_mixture, stft


def class_power_spectra(batches, n_fft, max_batches):
    """[N, n_fft / 2 + 1] mean power per bin of each source, over the first ``max_batches`` batches of solo
    crops (each a dict with ``sources`` [B, N, T])."""
    total, frames = None, 0
    for i, batch in enumerate(batches):
        if i == max_batches:
            break
        sources = batch["sources"].double()
        if sources.shape[-1] < n_fft:
            raise ValueError(f"separation.template_fft = {n_fft} needs training crops of at least {n_fft} samples, "
                             f"got {sources.shape[-1]}; use a smaller window or longer data.crop_length")
        power = stft(sources, n_fft).abs().pow(2)  # [B, N, F, K]
        summed = power.sum(dim=(0, 3))
        total = summed if total is None else total + summed
        frames += power.shape[0] * power.shape[3]
    if total is None:
        raise ValueError("no training crops to estimate the class spectra from: the training split is empty")
    return (total / frames).float()


class SpectralTemplate(nn.Module):
    """Stationary Gaussian priors, one power spectrum per source: the separator's model and its selection prior."""
    selection_label = "stationary Gaussian priors (Whittle likelihood)"

    def __init__(self, spectra, n_fft):
        super().__init__()
        if spectra.dim() != 2 or spectra.shape[1] != n_fft // 2 + 1:
            raise ValueError(f"spectra must be [sources, n_fft / 2 + 1] = [N, {n_fft // 2 + 1}], "
                             f"got {tuple(spectra.shape)}")
        self.n_fft = n_fft
        self.register_buffer("spectra", spectra.clamp_min(1e-12))

    def log_prob(self, x):
        """Whittle's log-likelihood per sample of each source of x [M, N, T]: [M, N]."""
        power = stft(x.double(), self.n_fft).abs().pow(2)  # [M, N, F, K]
        spectra = self.spectra.double().view(1, -1, power.shape[2], 1)
        frames = power.shape[-1]
        loglik = -(power / spectra + torch.log(math.pi * spectra)).sum(dim=(2, 3))
        return (loglik / (frames * self.n_fft)).float()


class TemplateSeparator(nn.Module):
    """Every chain is the same estimate (the posterior mean): ``separation.n_chains=1`` is enough."""
    n_steps = 1
    trace_sigmas = [0.0]

    def __init__(self, template, alpha):
        super().__init__()
        self.score_model = template
        self.register_buffer("alpha", torch.as_tensor(alpha, dtype=torch.float32))
        self.nonfinite_steps = 0

    @torch.no_grad()
    def forward(self, mix, n_chains, seeds):
        alpha = self.alpha.to(mix.dtype)
        power = (alpha.pow(2)[:, None] * self.score_model.spectra.to(mix.dtype))[..., None]  # [N, F, 1]
        estimate = share_mixture(mix.float(), power, self.score_model.n_fft) / alpha[:, None]  # [B, N, T]
        samples = estimate.unsqueeze(1).expand(-1, n_chains, -1, -1).contiguous()
        residual = mix.float().unsqueeze(1) - (alpha.view(1, 1, -1, 1) * samples).sum(dim=2)
        mix_error = residual.pow(2).mean(dim=(1, 2)).unsqueeze(1)
        return samples, {"loglik": torch.full_like(mix_error, math.nan), "mix_error": mix_error}
