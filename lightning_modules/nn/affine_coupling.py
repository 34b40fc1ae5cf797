"""Affine coupling (RealNVP) whose scale and shift come from a non-causal gated WaveNet."""
import torch
from torch import nn

from lightning_modules.nn.gated_wavenet import GatedWaveNet


class AffineCoupling(nn.Module):
    """Splits channels into halves (a, b); ``b' = b * exp(log_s(a)) + t(a)``, ``a`` passes unchanged.

    The Jacobian is triangular, so ``log|det J| = sum(log_s)`` per example and prior.

    Under mixed precision only the WaveNet runs in half precision: its outputs are cast to float32
    before they transform the signal and before the log-det sum, which accumulates thousands of terms
    per example and would lose whole nats in bf16.
    """

    def __init__(self, n_groups, channels, width, n_layers, kernel_size=3):
        super().__init__()
        if channels % 2:
            raise ValueError(f"AffineCoupling needs an even channel count, got {channels}")
        self.net = GatedWaveNet(n_groups, channels // 2, channels, width, n_layers, kernel_size)

    def forward(self, x):
        x_a, x_b = x.chunk(2, dim=2)
        y_b, logdet = self.transform(x_a, x_b)
        return torch.cat([x_a.to(y_b.dtype), y_b], dim=2), logdet

    def transform(self, x_a, x_b):
        """The coupling on the halves: ``(y_b, log|det J|)``; ``x_a`` passes unchanged."""
        dtype = torch.promote_types(x_a.dtype, torch.float32)  # float64 stays float64 (exactness tests)
        log_s, t = self.net(x_a).to(dtype).chunk(2, dim=2)
        return torch.addcmul(t, x_b, torch.exp(log_s)), log_s.sum(dim=(2, 3))

    def reverse(self, y):
        y_a, y_b = y.chunk(2, dim=2)
        log_s, t = self.net(y_a).chunk(2, dim=2)
        return torch.cat([y_a, (y_b - t.to(y_b.dtype)) * torch.exp(-log_s.to(y_b.dtype))], dim=2)
