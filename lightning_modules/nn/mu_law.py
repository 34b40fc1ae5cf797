"""mu-law companding (ITU-T G.711), as WaveNet quantises audio into 256 classes."""
import math

import torch


def mu_law_compand(x, mu=255):
    """[-1, 1] -> [-1, 1], continuous and differentiable."""
    x = x.clamp(-1.0, 1.0)
    return torch.sign(x) * torch.log1p(mu * x.abs()) / math.log1p(mu)


def mu_law_encode(x, mu=255):
    """Audio in [-1, 1] (clamped) -> class index in [0, mu]."""
    return ((mu_law_compand(x, mu) + 1) / 2 * mu + 0.5).long()


def mu_law_decode(index, mu=255):
    """Class index -> audio value at the class centre."""
    y = index.to(torch.get_default_dtype()) / mu * 2 - 1
    return torch.sign(y) * torch.expm1(y.abs() * math.log1p(mu)) / mu
