"""Separation metrics and the "Average" baseline.

* SI-SDR (torchmetrics, zero-mean: Le Roux et al. 2019) per source, and its improvement over the mix
  (the mix itself scored as the estimate of every source), as asteroid reports ``si_sdr_imp``.
  Invariant to the scale of the estimate.
* SDR from museval's BSSEval v4: 1 s windows (the whole signal when shorter), median over windows.
  museval scores the estimate against the reference itself (the "images" decomposition), so in every
  window SDR = 10 log10(||s||^2 / ||s_hat - s||^2): it is NOT scale invariant (s_hat = s / 2 scores 6 dB).
* The windowed protocol of recent generative separators (``windowed_si_sdri``).
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


def window_starts(length, window, hop):
    """(starts, window length): whole windows on a grid of ``hop`` samples; the tail after the last whole
    window (less than a hop) is not scored. An item shorter than a window is one window of the whole item."""
    if window <= 0 or hop <= 0:
        raise ValueError(f"window and hop must be positive, got {window} and {hop}")
    if length <= window:
        return [0], length
    return list(range(0, length - window + 1, hop)), window


def windowed_si_sdri(estimates, references, mix, window, hop, threshold=1.5e-5):
    """SI-SDRi over windows, skipping those where at most one source is active.

    estimates/references [N, T], mix [T]; ``window``/``hop`` in samples. Source k is inactive in a window
    of length L when ||x_k||_2 / L < ``threshold`` (the datasets' silence rule). In a kept window every
    source is scored, as the protocol does, with SI-SDR(estimate) - SI-SDR(mix) against its reference.
    Returns (mean SI-SDRi per source over the kept windows [N] (NaN if none), kept windows, windows).
    """
    starts, length = window_starts(references.shape[-1], window, hop)
    kept = []
    for start in starts:
        piece = slice(start, start + length)
        active = references[:, piece].double().norm(dim=-1) / length >= threshold
        if int(active.sum()) >= 2:
            kept.append(si_sdr(estimates[:, piece], references[:, piece])
                        - si_sdr_of_mix(mix[piece], references[:, piece]))
    if not kept:
        return torch.full((references.shape[0],), float("nan"), dtype=torch.float64), 0, len(starts)
    return torch.stack(kept).mean(dim=0), len(kept), len(starts)
