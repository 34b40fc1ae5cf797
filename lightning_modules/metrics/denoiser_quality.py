"""How good a score prior's denoisers are, per source and noise level: the fraction of the noise they leave,

    noise_left(sigma) = E ||D(x + sigma eps, sigma) - x||^2 / (T sigma^2),

on fixed crops and a fixed noise draw, beside the linear (Wiener) denoiser's, the best scalar shrinkage
D_lin = v / (v + sigma^2) (x + sigma eps) with v the crops' mean square per source. 1 is no denoising at all;
a periodic waveform allows far below the linear value, and a separator needs it (docs/separation.md).
"""
import torch

QUALITY_SIGMAS = (0.01, 0.03, 0.1, 0.3, 1.0)


@torch.no_grad()
def denoiser_quality(prior, x, sigmas=QUALITY_SIGMAS, seed=0):
    """x [B, N, T] clean crops -> {"sigmas", "noise_left": [S][N], "linear_noise_left": [S][N]}."""
    x = x.float()
    generator = torch.Generator(device=x.device).manual_seed(seed)
    noise = torch.randn(x.shape, generator=generator, device=x.device)
    power = x.pow(2).mean(dim=(0, 2))  # [N]
    left, linear = [], []
    for sigma in sigmas:
        noisy = x + sigma * noise
        denoised = prior.denoise(noisy, sigma).float()
        left.append(((denoised - x).pow(2).mean(dim=(0, 2)) / sigma**2).tolist())
        shrink = (power / (power + sigma**2)).view(1, -1, 1)
        linear.append(((shrink * noisy - x).pow(2).mean(dim=(0, 2)) / sigma**2).tolist())
    return {"sigmas": list(sigmas), "noise_left": left, "linear_noise_left": linear}


def quality_markdown(report, sources):
    lines = ["Fraction of the noise left, ||D(x + sigma eps, sigma) - x||^2 / (T sigma^2) (lower is better; "
             "linear = the best scalar shrinkage)", "",
             "| sigma | " + " | ".join(f"{s} | {s} (linear)" for s in sources) + " |",
             "|---" * (1 + 2 * len(sources)) + "|"]
    for sigma, left, linear in zip(report["sigmas"], report["noise_left"], report["linear_noise_left"]):
        cells = [f"{a:.4f} | {b:.4f}" for a, b in zip(left, linear)]
        lines.append(f"| {sigma:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
