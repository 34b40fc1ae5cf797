"""Review fixes of the score-prior family and the diffusion sampler: the paper presets' sigma sampling, the
ODE likelihood's per-row step control and float32 precision, the sampler's sigma cap, and EDM's Table 1."""
import logging
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import experiments
from experiments.config import load_config
from lightning_modules.nn.gaussian_prior import GaussianPrior
from lightning_modules.nn.probability_flow import ode_log_prob
from lightning_modules.nn.score_prior import ScoreConfig, ScorePrior
from lightning_modules.nn.source_subset import SourceSubset
from lightning_modules.samplers.diffusion import DiffusionSeparator
from lightning_modules.samplers.level_score import LevelScore
from lightning_modules.samplers.mixing import mixing_weights

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_score_prior(n_sources=3, seed=0, **options):
    """A tiny score prior whose network output is not zero (its output conv is randomised)."""
    torch.manual_seed(seed)
    prior = ScorePrior(n_sources, ScoreConfig(width=8, n_layers=2, squeeze=2, embed_dim=8, **options))
    prior.set_sigma_data([0.5, 1.0, 2.0][:n_sources])
    torch.nn.init.normal_(prior.net.end_out.conv.weight, std=0.3)
    torch.nn.init.normal_(prior.net.end_out.conv.bias, std=0.1)
    return prior


# 1. The paper presets sample sigma as ISDM does: ln(sigma) ~ N(-3, 1).

def test_paper_presets_sample_sigma_like_isdm():
    model = load_config("toy_score", "paper").model
    assert (model.sigma_sampling, model.p_mean, model.p_std) == ("lognormal", -3.0, 1.0)
    for experiment in ("musdb_score", "slakh_score"):  # read as files: their data.n_test: null fails load_config
        model = OmegaConf.load(Path(experiments.__file__).parent / experiment / "paper.yaml").model
        assert (model.sigma_sampling, model.p_mean, model.p_std) == ("lognormal", -3.0, 1.0)


# 2. The ODE likelihood of one (crop, prior) row does not depend on the other rows of its batch.

MODE, MODE_VAR = 1.0, 0.05  # x_0 ~ 0.5 N(-MODE, MODE_VAR) + 0.5 N(MODE, MODE_VAR) per sample


def two_mode_denoiser(x, sigma):
    """E[x_0 | x_0 + sigma eps]: a tanh that turns sharp at small sigma, i.e. a high-curvature flow between
    the modes. sigma is one value or one per row [B, N]."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype)
    var = MODE_VAR + (sigma.unsqueeze(-1) if sigma.dim() else sigma) ** 2
    return (MODE_VAR * x + (var - MODE_VAR) * MODE * torch.tanh(MODE * x / var)) / var


def two_mode_log_prob(x, sigma):
    var = MODE_VAR + sigma**2
    modes = torch.stack([-(x - MODE) ** 2, -(x + MODE) ** 2]) / (2 * var)
    return (torch.logsumexp(modes, 0) - math.log(2) - 0.5 * math.log(2 * math.pi * var)).mean(-1)


def test_a_rows_log_likelihood_does_not_depend_on_its_batch():
    generator = torch.Generator().manual_seed(0)
    hard = 0.3 * torch.randn(1, 1, 8, generator=generator, dtype=F64)  # between the modes: a curved path
    signs = torch.randn(63, 1, 8, generator=generator, dtype=F64).sign()
    easy = MODE * signs + MODE_VAR**0.5 * torch.randn(63, 1, 8, generator=generator, dtype=F64)  # on the modes
    kwargs = dict(sigma_min=1e-2, sigma_max=100.0, sigma_data=(MODE**2 + MODE_VAR) ** 0.5, rtol=1e-3, atol=1e-3)
    alone, _ = ode_log_prob(two_mode_denoiser, hard, **kwargs)
    batched, _ = ode_log_prob(two_mode_denoiser, torch.cat([easy[:40], hard, easy[40:]]), **kwargs)
    # With one step-size controller for the batch the easy rows diluted the hard row's error: 0.077 nats per
    # sample apart (and 0.11 from the exact value instead of 0.03 alone).
    assert (batched[40] - alone[0]).abs().max() < 1e-9, (batched[40], alone[0])
    assert (alone - two_mode_log_prob(hard, 1e-2)).abs().max() < 0.05
    halves = torch.cat([ode_log_prob(two_mode_denoiser, part, **kwargs)[0] for part in (easy[:20], easy[20:])])
    torch.testing.assert_close(halves, torch.cat([batched[:40], batched[41:]]), rtol=0, atol=1e-9)  # a DDP split


# 3. Likelihoods are float32 whatever the training precision.

def test_log_prob_is_float32_under_bf16_autocast():
    prior = tiny_score_prior()
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = prior.log_prob(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = prior.log_prob(x)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, full, rtol=1e-6, atol=1e-6)


# 4. and 5. The diffusion sampler never asks a score model for a sigma above the largest it was trained at.

class RecordingScorePrior(ScorePrior):
    def score(self, x, sigma):
        self.sigmas_asked.append(float(sigma))
        return super().score(x, sigma)


class RecordingLevelScore(LevelScore):
    def score(self, x, sigma):
        self.sigmas_asked.append(float(sigma))
        return super().score(x, sigma)


def test_churn_never_raises_sigma_above_the_trained_sigma_max():
    prior = RecordingScorePrior(2, ScoreConfig(width=8, n_layers=2, squeeze=2, embed_dim=8, sigma_max=2.0))
    prior.sigmas_asked = []
    score_model = SourceSubset(prior, ["a", "b"], ["a", "b"])  # what separation hands the sampler
    # gamma = min(10 / 6, sqrt(2) - 1): without the cap the first step asks for 2 sqrt(2) = 2.83.
    separator = DiffusionSeparator(score_model, mixing_weights("mean", 2), sigma_max=2.0, sigma_min=0.01, steps=6,
                                   s_churn=10.0)
    with torch.no_grad():
        separator(torch.randn(1, 16), n_chains=2, seeds=[0])
    assert max(prior.sigmas_asked) == pytest.approx(2.0)
    churned = [s * math.sqrt(2) for s in separator.sigmas[:-1] if s * math.sqrt(2) < 2.0]
    assert churned and all(any(asked == pytest.approx(s) for asked in prior.sigmas_asked) for s in churned)


def test_a_likelihood_family_serves_no_sigma_above_its_top_level(caplog):
    means, stds = [0.2, -0.1], [0.1, 0.15]
    levels = RecordingLevelScore([(s, GaussianPrior(means, stds, noise_sigma=s)) for s in (1.0, 0.1, 0.0)])
    levels.sigmas_asked = []
    alpha = mixing_weights("mean", 2)
    with caplog.at_level(logging.WARNING):
        separator = DiffusionSeparator(levels, alpha, sigma_max=5.0, sigma_min=0.01, steps=8, s_churn=10.0)
        separator(torch.randn(1, 16), n_chains=2, seeds=[0])
        separator(torch.randn(1, 16), n_chains=2, seeds=[1])
    assert separator.sigmas[0] == 1.0 and separator.trace_sigmas[0] == 1.0  # the summary's step_sigmas say so
    assert max(levels.sigmas_asked) == pytest.approx(1.0)
    warnings = [r for r in caplog.records if "top fine-tuned level" in r.getMessage()]
    assert len(warnings) == 1 and "sigma_max=5 " in warnings[0].getMessage()
    # A schedule inside the levels is left alone, silently.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        inside = DiffusionSeparator(levels, alpha, sigma_max=0.8, sigma_min=0.01, steps=8)
    assert inside.sigmas[0] == 0.8 and not caplog.records
    # Only the noiseless level: no schedule fits under it, so it runs as asked, with a warning.
    with caplog.at_level(logging.WARNING):
        noiseless = DiffusionSeparator(LevelScore([(0.0, GaussianPrior(means, stds))]), alpha, sigma_max=1.0,
                                       sigma_min=0.01, steps=4)
    assert noiseless.sigmas[0] == 1.0 and "whole schedule" in caplog.records[-1].getMessage()


# 6. EDM's preconditioning and loss weight (Karras et al. 2022, Table 1) around a non-zero network.

def test_denoiser_and_loss_follow_edm_table_1_with_a_nonzero_network():
    prior = tiny_score_prior(sigma_sampling="lognormal", p_mean=-1.0, p_std=1.5)
    x = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(2))
    sd = prior.sigma_data.view(1, -1, 1)

    def table_1_denoiser(y, sigma):
        s = sigma.unsqueeze(-1)
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1 / (s**2 + sd**2).sqrt()
        c_noise = sigma.log() / 4
        network = prior.net(c_in * y, c_noise)
        assert network.abs().mean() > 0.1  # F really contributes
        return c_skip * y + c_out * network

    sigma = torch.tensor([[0.01, 0.3, 2.0], [0.1, 1.0, 5.0], [0.5, 0.05, 0.2], [3.0, 3.0, 3.0]])
    with torch.no_grad():
        torch.testing.assert_close(prior.denoise(x, sigma), table_1_denoiser(x, sigma), rtol=1e-5, atol=1e-6)
        # The training loss for a fixed draw: lambda(sigma) * MSE, lambda = (s^2 + sd^2) / (s sd)^2.
        loss = prior.training_loss(x, torch.Generator().manual_seed(3))
        generator = torch.Generator().manual_seed(3)  # the same draws: sigma, then the noise
        sigma = prior.sample_sigma(x.shape[:2], generator, x.device)
        noise = torch.randn(x.shape, generator=generator)
        weight = (sigma**2 + sd[..., 0] ** 2) / (sigma * sd[..., 0]) ** 2
        expected = weight * (table_1_denoiser(x + sigma.unsqueeze(-1) * noise, sigma) - x).pow(2).mean(dim=2)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
