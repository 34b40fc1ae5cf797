"""Random draws per mixture: a mixture's chains are the same whichever other mixtures share its batch or rank."""
import torch


def per_mixture_draws(seeds, shape, device):
    """``draw(torch.randn)`` -> [B * C, N, T]: each mixture's ``shape`` [C, N, T] from its own generator,
    so a mixture's chains do not depend on which other mixtures share the batch or the DDP rank."""
    generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def draw(sampler):
        return torch.cat([sampler(shape, generator=g, device=device) for g in generators])

    return draw
