"""Random draws per mixture: a mixture's chains are the same whichever other mixtures share its batch or rank."""
import torch


def per_mixture_draws(seeds, shape, device):
    """``draw(torch.randn)`` -> [B * C, N, T]: each mixture's ``shape`` [C, N, T] from its own generator,
    so a mixture's chains do not depend on which other mixtures share the batch or the DDP rank."""
    generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def draw(sampler):
        return torch.cat([sampler(shape, generator=g, device=device) for g in generators])

    return draw


def categorical_draw(probs, generator):
    """One index per row of probs [R, J] (each row summing to 1), by the inverse of its cumulative sum: one
    uniform per row. ``torch.multinomial`` draws J exponentials per row instead, which at the latent
    posterior's J = K^2 = 65536 pairs was three quarters of the separation's time on CPU."""
    cdf = probs.double().cumsum(dim=-1)
    uniform = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64, device=probs.device)
    # right=True: the first index whose cdf exceeds u, so an entry of zero probability is never chosen.
    index = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True)
    return index.squeeze(1).clamp(max=probs.shape[1] - 1)
