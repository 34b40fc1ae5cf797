"""Multi-resolution STFT loss (spectral convergence + L1 of log magnitudes), the usual spectral term of
audio autoencoders (Yamamoto et al. 2020; Jukebox uses a similar multi-scale spectral loss)."""
import torch


def stft_magnitude(x, n_fft):
    window = torch.hann_window(n_fft, device=x.device, dtype=torch.float32)
    spectrum = torch.stft(x.float(), n_fft, hop_length=n_fft // 4, window=window, return_complex=True)
    return spectrum.abs().clamp_min(1e-7)


def multi_resolution_stft_loss(estimate, target, fft_sizes):
    """estimate, target [B, T] -> [B]: mean over resolutions of ||S - S^||_F / ||S||_F + mean|log S - log S^|.
    Resolutions longer than the signal are skipped."""
    losses = []
    for n_fft in fft_sizes:
        if n_fft > target.shape[-1]:
            continue
        s_hat, s = stft_magnitude(estimate, n_fft), stft_magnitude(target, n_fft)
        convergence = (s - s_hat).flatten(1).norm(dim=1) / s.flatten(1).norm(dim=1).clamp_min(1e-7)
        log_distance = (s.log() - s_hat.log()).abs().flatten(1).mean(dim=1)
        losses.append(convergence + log_distance)
    if not losses:
        return estimate.new_zeros(estimate.shape[0])
    return torch.stack(losses).mean(dim=0)
