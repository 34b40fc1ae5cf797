"""Separation metrics and the "Average" baseline.

* SI-SDR (torchmetrics, zero-mean: Le Roux et al. 2019) per source, and its improvement over the mix
  (the mix itself scored as the estimate of every source), as asteroid reports ``si_sdr_imp``.
* SDR from museval's BSSEval v4: 1 s windows (the whole signal when shorter), median over windows.
"""
import numpy as np
import torch
from torchmetrics.functional.audio import scale_invariant_signal_distortion_ratio


def si_sdr(estimates, references):
    """SI-SDR in dB over the last axis; any leading shape, broadcast between the two."""
    estimates, references = torch.broadcast_tensors(estimates.double(), references.double())
    return scale_invariant_signal_distortion_ratio(estimates, references, zero_mean=True)


def si_sdr_of_mix(mix, references):
    """mix [..., T], references [..., N, T] -> [..., N]: the score every improvement is measured from."""
    return si_sdr(mix.unsqueeze(-2), references)


def bss_sdr(estimates, references, sample_rate):
    """museval BSSEval v4 SDR for one mixture: estimates/references [N, T] -> [N] (median over windows)."""
    import museval  # slow to import; only the evaluation needs it

    references = np.asarray(references.detach().double().cpu())[..., None]
    estimates = np.asarray(estimates.detach().double().cpu())[..., None]
    window = min(int(sample_rate), references.shape[1])
    sdr, _, _, _ = museval.evaluate(references, estimates, win=window, hop=window)
    return torch.from_numpy(np.nanmedian(sdr, axis=1))


def average_baseline(mix, alpha):
    """Paper 004 section 5: every source estimated as m * (1/N) / alpha_k. mix [..., T] -> [..., N, T]."""
    alpha = torch.as_tensor(alpha, dtype=mix.dtype, device=mix.device)
    return mix.unsqueeze(-2) / (len(alpha) * alpha.unsqueeze(-1))
