"""The bounded posterior of the variational separator: a normal truncated to [low, high] (thesis
"Choosing a posterior": audio lives in [-1, 1]).

With standardised bounds a = (low - loc) / scale, b = (high - loc) / scale and Z = Phi(b) - Phi(a):

    log q(x)  = log phi((x - loc) / scale) - log scale - log Z        on [low, high], -inf outside
    mean      = loc + scale (phi(a) - phi(b)) / Z
    variance  = scale^2 [1 + (a phi(a) - b phi(b)) / Z - ((phi(a) - phi(b)) / Z)^2]
    entropy   = log(sqrt(2 pi e) scale Z) + (a phi(a) - b phi(b)) / (2 Z)

Samples are reparameterised by the inverse CDF: x = loc + scale Phi^-1(Phi(a) + u Z), u ~ U(0, 1).
Near the upper bound Phi(a) + u Z rounds to 1, so that side is computed as -Phi^-1(Phi(-b) + (1 - u) Z),
a sum of positive terms. Everything runs in float64: the tails of Phi lose float32 precision quickly.
The posterior network keeps loc inside [low, high], where Z >= Phi(0) - Phi(a) never underflows.
"""
import math

import torch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def normal_pdf(z):
    return torch.exp(-0.5 * z * z - LOG_SQRT_2PI)


class TruncatedNormal:
    def __init__(self, loc, scale, low=-1.0, high=1.0):
        if not low < high:
            raise ValueError(f"a truncated normal needs low < high, got [{low}, {high}]")
        self.dtype = loc.dtype
        self.loc, self.scale = loc.double(), scale.double()
        self.low, self.high = float(low), float(high)
        self.a = (self.low - self.loc) / self.scale
        self.b = (self.high - self.loc) / self.scale
        self.cdf_a, self.cdf_minus_b = torch.special.ndtr(self.a), torch.special.ndtr(-self.b)
        # Z = Phi(b) - Phi(a) = 1 - Phi(-b) - Phi(a): no cancellation while loc is inside the bounds.
        self.z = (1 - self.cdf_a - self.cdf_minus_b).clamp_min(1e-300)
        self.log_z = torch.log(self.z)

    def log_prob(self, x):
        """Log-density per element; -inf outside [low, high]."""
        x = x.double()
        standard = (x - self.loc) / self.scale
        density = -0.5 * standard * standard - LOG_SQRT_2PI - torch.log(self.scale) - self.log_z
        inside = (x >= self.low) & (x <= self.high)
        return torch.where(inside, density, torch.full_like(density, -math.inf)).to(self.dtype)

    @property
    def mean(self):
        return (self.loc + self.scale * (normal_pdf(self.a) - normal_pdf(self.b)) / self.z).to(self.dtype)

    @property
    def variance(self):
        a, b, z = self.a, self.b, self.z
        shift = (normal_pdf(a) - normal_pdf(b)) / z
        spread = (a * normal_pdf(a) - b * normal_pdf(b)) / z
        return (self.scale**2 * (1 + spread - shift**2)).clamp_min(0).to(self.dtype)

    def entropy(self):
        a, b, z = self.a, self.b, self.z
        # a phi(a) -> 0 as a -> -inf, but inf * 0 is nan: an infinite bound contributes nothing.
        edge = torch.nan_to_num(a * normal_pdf(a)) - torch.nan_to_num(b * normal_pdf(b))
        return (0.5 + LOG_SQRT_2PI + torch.log(self.scale) + self.log_z + edge / (2 * z)).to(self.dtype)

    def rsample(self, uniform):
        """A reparameterised sample from ``uniform`` ~ U(0, 1) of the distribution's shape."""
        u = uniform.double().clamp(1e-12, 1 - 1e-12)
        lower_side = self.cdf_a + u * self.z
        upper_side = self.cdf_minus_b + (1 - u) * self.z
        standard = torch.where(lower_side < 0.5, torch.special.ndtri(lower_side.clamp(max=0.5)),
                               -torch.special.ndtri(upper_side.clamp(max=0.5)))
        x = self.loc + self.scale * standard
        return x.clamp(self.low, self.high).to(self.dtype)
