"""A Wiener post-filter: the mixture's STFT shared among the sources in proportion to the power of their estimates.

    C_k = STFT(alpha_k x_k),  mask_k = |C_k|^2 / sum_j |C_j|^2,  alpha_k y_k = ISTFT(mask_k STFT(m))

The estimates x give each time-frequency bin's shares; the mixture gives every bin's magnitude and phase. So a
source whose estimate has the right spectral envelope but the wrong waveform (a codec's reconstruction, a phase
it cannot know) comes back with the mixture's phase, and the filtered sources sum to m exactly (the masks sum to
1 in every bin, and the ISTFT is linear). The usual last step of spectrogram separators (Open-Unmix, Demucs'
"Wiener" option); ``separation.wiener_fft`` applies it to finished estimates. Bins where every estimate is silent
are shared equally. ``posterior_wiener`` shares the mixture by the power averaged over all of a sampler's chains.
"""
import torch

EPSILON = 1e-10  # relative to the bin's total power: a bin silent in every estimate is split equally


def check_window(n_fft, name="separation.wiener_fft", off_allowed=True):
    """Refuse an STFT window (``name``'s value) that cannot be used, before any separation work is done; 0 means
    off where ``off_allowed``."""
    if (n_fft != 0 or not off_allowed) and (n_fft < 4 or n_fft % 2):
        off = "0 (off) or " if off_allowed else ""
        raise ValueError(f"{name} must be {off}an even window of at least 4 samples, got {n_fft}")


def check_length(n_fft, length):
    if n_fft == 0:
        raise ValueError("the Wiener filter needs a window: separation.wiener_fft = 0 means no filter")
    check_window(n_fft)
    if length <= n_fft // 2:
        raise ValueError(f"separation.wiener_fft = {n_fft} needs estimates longer than {n_fft // 2} samples, got "
                         f"{length}; use a smaller window or longer chunks (separation.length)")


def stft(x, n_fft):
    """[..., T] -> [..., n_fft / 2 + 1, frames]: Hann windows of n_fft samples, hop n_fft / 4."""
    window = torch.hann_window(n_fft, dtype=x.dtype, device=x.device)
    spectrum = torch.stft(x.reshape(-1, x.shape[-1]), n_fft, n_fft // 4, window=window, return_complex=True)
    return spectrum.view(*x.shape[:-1], *spectrum.shape[-2:])


def share_mixture(mix, power, n_fft):
    """The mixture's STFT shared among N parts in proportion to ``power`` [..., N, F, frames] (or [N, F, 1], one
    mask per bin for every frame): the parts [..., N, T], which sum to mix [..., T] exactly."""
    length = mix.shape[-1]
    total = power.sum(dim=-3, keepdim=True)
    floor = EPSILON * total + 1e-30
    masks = (power + floor) / (total + power.shape[-3] * floor)
    shared = masks * stft(mix, n_fft).unsqueeze(-3)
    window = torch.hann_window(n_fft, dtype=mix.dtype, device=mix.device)
    parts = torch.istft(shared.reshape(-1, *shared.shape[-2:]), n_fft, n_fft // 4, window=window, length=length)
    return parts.view(*shared.shape[:-2], length)


def wiener_filter(mix, estimates, alpha, n_fft):
    """estimates [..., N, T] refiltered from mix [..., T]: windows of n_fft samples (Hann), hop n_fft / 4."""
    length = estimates.shape[-1]
    check_length(n_fft, length)
    alpha = alpha.to(estimates.dtype)
    power = stft(alpha[:, None] * estimates, n_fft).abs().pow(2)
    contributions = share_mixture(mix.expand(*estimates.shape[:-2], length), power, n_fft)
    return contributions / alpha[:, None]


def posterior_wiener(mix, chains, alpha, n_fft):
    """One estimate [..., N, T] from every chain [..., C, N, T] of mix [..., T]: each bin's share is the source's
    power averaged over the chains, a Monte Carlo estimate of its posterior expected power E[|C_k|^2 | m], so bins
    where the chains disagree are split by how often each source holds them rather than by one chain's draw."""
    check_length(n_fft, chains.shape[-1])
    alpha = alpha.to(chains.dtype)
    power = stft(alpha[:, None] * chains, n_fft).abs().pow(2).mean(dim=-4)
    return share_mixture(mix, power, n_fft) / alpha[:, None]
