"""The probability-flow ODE likelihood against Gaussian priors, whose noisy densities are closed-form."""

import pytest
import torch
from torch import nn

from lightning_modules.nn.probability_flow import (
    exact_divergence,
    gaussian_log_prob,
    hutchinson_divergence,
    ode_log_prob,
    rademacher_probes,
)

F64 = torch.float64
SIGMA_DATA = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
SIGMA_MIN, SIGMA_MAX = 1e-3, 100.0


pytestmark = pytest.mark.usefixtures("one_thread")


def per_row(sigma):
    """A denoiser's sigma, one value or one per row [B, N], as something that broadcasts against [B, N, T]."""
    return sigma.unsqueeze(-1) if sigma.dim() else sigma


def diagonal_gaussian_denoiser(x, sigma):
    """E[x_0 | x] for x_0 ~ N(0, sigma_data_k^2 I) per channel."""
    var = SIGMA_DATA.to(x.dtype).view(1, -1, 1) ** 2
    return var / (var + per_row(sigma) ** 2) * x


def closed_form_diagonal(x, sigma):
    var = SIGMA_DATA.view(1, -1) ** 2 + sigma**2
    return gaussian_log_prob(x, var) / x.shape[-1]


def circulant_covariances(length, scales):
    """C_k = scale_k^2 K with K a circulant smoothing covariance whose diagonal is 1: correlated samples."""
    row = torch.zeros(length, dtype=F64)
    row[0], row[1], row[-1], row[2], row[-2] = 0.5, 0.3, 0.3, 0.1, 0.1
    smoother = torch.stack([torch.roll(row, i) for i in range(length)])
    kernel = smoother @ smoother.T + 0.05 * torch.eye(length, dtype=F64)
    return scales.view(-1, 1, 1) ** 2 * kernel / kernel.diagonal().mean()


class CirculantGaussianDenoiser:
    """E[x_0 | x] = C (C + sigma^2 I)^-1 x for x_0 ~ N(0, C_k): a linear D with a non-diagonal Jacobian."""

    def __init__(self, covariances):
        self.covariances = covariances

    def __call__(self, x, sigma):
        eye = torch.eye(x.shape[-1], dtype=F64)
        sigma = sigma.expand(x.shape[:2])[..., None, None]  # [B, N, 1, 1]
        # C and (C + sigma^2 I)^-1 commute, so the solve gives the same matrix as C (C + sigma^2 I)^-1.
        gain = torch.linalg.solve(self.covariances + sigma**2 * eye, self.covariances.expand(*x.shape[:2], -1, -1))
        return torch.einsum("bknm,bkm->bkn", gain, x)


class TinyConvDenoiser(nn.Module):
    """A random nonlinear, sigma-dependent denoiser; grouped convolutions keep the channels independent."""

    def __init__(self, n_sources=3, width=4):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Conv1d(n_sources, n_sources * width, 3, padding=1, groups=n_sources).double()
        self.out = nn.Conv1d(n_sources * width, n_sources, 3, padding=1, groups=n_sources).double()

    def forward(self, x, sigma):
        # EDM preconditioning (sigma_data = 1) keeps the network input at unit scale at every sigma.
        sigma = per_row(sigma)
        c_skip, c_out, c_in = 1 / (1 + sigma**2), sigma / (1 + sigma**2) ** 0.5, 1 / (1 + sigma**2) ** 0.5
        return c_skip * x + c_out * self.out(torch.tanh(self.inp(c_in * x)))


def gaussian_batch(seed=0, shape=(2, 3, 16)):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=F64, generator=generator) * SIGMA_DATA.view(1, -1, 1)


# For a diagonal Jacobian, v^T J v = sum_i J_ii v_i^2 = tr J whenever v_i^2 = 1, so Rademacher Hutchinson
# is exact here; the circulant test below is the one that exercises its randomness.
# The prior N(0, sigma_max^2 + sigma_data^2) is exact for this data, so even a short flow is exact.
@pytest.mark.parametrize("divergence,sigma_max", [("exact", SIGMA_MAX), ("hutchinson", SIGMA_MAX), ("exact", 2.0)])
def test_diagonal_gaussian_matches_the_closed_form(divergence, sigma_max):
    x = gaussian_batch()
    log_prob, info = ode_log_prob(diagonal_gaussian_denoiser, x, SIGMA_MIN, sigma_max, SIGMA_DATA,
                                  divergence=divergence, rtol=1e-5, atol=1e-5)
    expected = closed_form_diagonal(x, SIGMA_MIN)
    assert log_prob.shape == (2, 3) and info["divergence"] == divergence
    torch.testing.assert_close(log_prob, expected, rtol=1e-4, atol=0)


def test_default_tolerance_is_accurate_to_a_few_parts_in_ten_thousand():
    x = gaussian_batch()
    log_prob, info = ode_log_prob(diagonal_gaussian_denoiser, x, SIGMA_MIN, SIGMA_MAX, SIGMA_DATA)
    torch.testing.assert_close(log_prob, closed_form_diagonal(x, SIGMA_MIN), rtol=1e-3, atol=0)
    assert info["function_evaluations"] < 200


def test_circulant_gaussian_exact_and_hutchinson():
    length, scales = 32, torch.tensor([0.7, 1.5], dtype=F64)
    covariances = circulant_covariances(length, scales)
    denoise = CirculantGaussianDenoiser(covariances)
    generator = torch.Generator().manual_seed(1)
    x = torch.einsum("knm,bkm->bkn", torch.linalg.cholesky(covariances),
                     torch.randn(2, 2, length, dtype=F64, generator=generator))
    sigma_min, eye = 1e-2, torch.eye(length, dtype=F64)
    noisy = torch.distributions.MultivariateNormal(torch.zeros(length, dtype=F64), covariances + sigma_min**2 * eye)
    expected = noisy.log_prob(x) / length

    # sigma_data^2 = mean eigenvalue of C_k: the isotropic prior at sigma_max = 100 errs only to second order.
    exact, _ = ode_log_prob(denoise, x, sigma_min, SIGMA_MAX, scales, divergence="exact", rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exact, expected, rtol=1e-4, atol=0)

    estimated, info = ode_log_prob(denoise, x, sigma_min, SIGMA_MAX, scales, divergence="hutchinson", n_probes=256)
    assert info["n_probes"] == 256
    torch.testing.assert_close(estimated, expected, rtol=0.05, atol=0)
    single, _ = ode_log_prob(denoise, x, sigma_min, SIGMA_MAX, scales, divergence="hutchinson", n_probes=1)
    assert ((single - expected).abs() / expected.abs()).max() > 1e-2  # the off-diagonal terms do matter here


def brute_force_trace(denoise, x, sigma):
    jacobian = torch.autograd.functional.jacobian(lambda y: denoise(y, sigma), x)  # [B, N, T, B, N, T]
    batch, n_sources, _ = x.shape
    return torch.stack([
        torch.stack([jacobian[b, k, :, b, k, :].diagonal().sum() for k in range(n_sources)]) for b in range(batch)
    ])


@pytest.mark.parametrize("chunk_size", [3, 64])
def test_exact_divergence_of_a_nonlinear_denoiser_is_the_jacobian_trace(chunk_size):
    denoise, sigma = TinyConvDenoiser(), torch.tensor(0.7, dtype=F64)
    x = gaussian_batch(seed=2, shape=(2, 3, 8))
    denoised, trace = exact_divergence(denoise, x, sigma, chunk_size=chunk_size)
    torch.testing.assert_close(denoised, denoise(x, sigma).detach())
    torch.testing.assert_close(trace, brute_force_trace(denoise, x, sigma), rtol=1e-10, atol=1e-10)


def test_hutchinson_divergence_is_unbiased():
    denoise, sigma = TinyConvDenoiser(), torch.tensor(0.7, dtype=F64)
    x = gaussian_batch(seed=2, shape=(2, 3, 8))
    probes = rademacher_probes((4000, 2, 3, 8), seed=0, dtype=F64, device="cpu")
    _, estimate = hutchinson_divergence(denoise, x, sigma, probes)
    torch.testing.assert_close(estimate, brute_force_trace(denoise, x, sigma), rtol=0, atol=0.05)


def test_channels_are_independent_priors():
    denoise = TinyConvDenoiser()
    x = gaussian_batch(seed=3, shape=(1, 3, 8))
    changed = x.clone()
    changed[:, 1] = 3 * torch.randn(8, dtype=F64)
    # Each channel has its own step-size controller, so channels 0 and 2 do not move at all.
    kwargs = dict(sigma_min=1e-2, sigma_max=50.0, sigma_data=SIGMA_DATA, rtol=1e-6, atol=1e-6)
    before, _ = ode_log_prob(denoise, x, **kwargs)
    after, _ = ode_log_prob(denoise, changed, **kwargs)
    assert (after[0, 1] - before[0, 1]).abs() > 0.1
    torch.testing.assert_close(after[0, [0, 2]], before[0, [0, 2]], rtol=0, atol=1e-12)


def test_info_and_divergence_choice():
    x = gaussian_batch()
    _, info = ode_log_prob(diagonal_gaussian_denoiser, x, SIGMA_MIN, SIGMA_MAX, SIGMA_DATA, rtol=1e-3, atol=1e-3)
    assert info["divergence"] == "exact" and info["function_evaluations"] > 7
    assert {k: info[k] for k in ("rtol", "atol", "sigma_min", "sigma_max")} == dict(
        rtol=1e-3, atol=1e-3, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    # One Dormand-Prince attempt costs 6 evaluations, after the first one.
    assert (info["function_evaluations"] - 1) % 6 == 0
    _, info = ode_log_prob(diagonal_gaussian_denoiser, x, SIGMA_MIN, SIGMA_MAX, SIGMA_DATA, exact_max_length=8,
                           n_probes=3, rtol=1e-3, atol=1e-3)
    assert info["divergence"] == "hutchinson" and info["n_probes"] == 3
    with pytest.raises(ValueError, match="auto, exact, hutchinson"):
        ode_log_prob(diagonal_gaussian_denoiser, x, SIGMA_MIN, SIGMA_MAX, SIGMA_DATA, divergence="skilling")


def test_too_few_steps_raise():
    with pytest.raises(RuntimeError, match="max_steps=3"):
        ode_log_prob(diagonal_gaussian_denoiser, gaussian_batch(), SIGMA_MIN, SIGMA_MAX, SIGMA_DATA, max_steps=3)


def test_works_under_inference_mode_and_keeps_the_dtype():
    x = gaussian_batch().float()

    def denoise(y, sigma):
        return diagonal_gaussian_denoiser(y, sigma).to(y.dtype)

    with torch.inference_mode():
        log_prob, _ = ode_log_prob(denoise, x, SIGMA_MIN, SIGMA_MAX, SIGMA_DATA.float(), divergence="hutchinson")
    assert log_prob.dtype == torch.float32
    torch.testing.assert_close(log_prob.double(), closed_form_diagonal(x.double(), SIGMA_MIN), rtol=1e-3, atol=0)
