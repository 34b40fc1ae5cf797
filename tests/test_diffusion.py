"""The ISDM / EDM diffusion separator against an analytic Gaussian prior, whose posterior is known."""
import math

import pytest
import torch

from lightning_modules.samplers.diffusion import DiffusionSeparator, karras_sigmas
from lightning_modules.samplers.mixing import mixing_weights
from lightning_modules.nn.gaussian_prior import GaussianPrior

MEANS, STDS = [0.2, -0.1, 0.0, 0.3], [0.1, 0.15, 0.2, 0.12]
UNEVEN = [0.4, 1.0, 0.7, 1.5]  # alpha_k / alpha_{N-1} != 1: pins the chain-rule ratio of the Dirac score
# Churn and correction steps bring the chains close; the Langevin steps at sigma_min finish the job. They
# are needed: the ODE along the Dirac path is not the diffusion of the posterior (without them the last
# source's variance is ~94 % too small with the plain ODE, ~10 % with churn + corrections). The Gaussian
# score at sigma_min is ~1/std^2, not ~1/sigma_min^2, hence the large langevin_eta (eta = 2e-4 for both).
DIRAC = dict(sigma_max=2.0, sigma_min=1e-3, steps=50, s_churn=40, corrections=2, langevin_steps=500, langevin_eta=200)
GAUSSIAN = dict(DIRAC, constraint="gaussian", sigma_min=1e-2, gamma_scale=1.0, langevin_eta=2.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian_mixture(alpha, length=1024, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sources = torch.tensor(MEANS).view(-1, 1) + torch.tensor(STDS).view(-1, 1) * torch.randn(4, length, generator=generator)
    return (alpha.view(-1, 1) * sources).sum(dim=0, keepdim=True)  # [1, T]


def empirical_moments(samples, exact_means):
    """samples [C, N, T]: mean and covariance of the deviation from the exact posterior mean."""
    deviation = samples.double() - exact_means
    count = deviation.shape[0] * deviation.shape[2]
    return deviation.mean(dim=(0, 2)), torch.einsum("cnt,cmt->nm", deviation, deviation) / count


def assert_matches_posterior(samples, exact_means, exact_cov):
    bias, cov = empirical_moments(samples, exact_means)
    scale = exact_cov.diagonal().sqrt()
    assert (bias.abs() < 0.05 * scale).all(), (bias, scale)
    assert torch.allclose(cov.diagonal(), exact_cov.diagonal(), rtol=0.1), (cov.diagonal(), exact_cov.diagonal())
    assert torch.allclose(cov, exact_cov, atol=0.1 * exact_cov.diagonal().min()), (cov, exact_cov)


class Counting(torch.nn.Module):
    """Wraps a score model, recording the sigma of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def score(self, x, sigma):
        assert isinstance(sigma, float)
        self.calls.append(sigma)
        return self.model.score(x, sigma)


def test_karras_schedule():
    sigmas = karras_sigmas(80.0, 0.002, 18, rho=7.0)
    assert len(sigmas) == 18 and sigmas[0] == 80.0 and sigmas[-1] == 0.002
    assert all(a > b for a, b in zip(sigmas, sigmas[1:]))
    assert sigmas[9] == pytest.approx((80 ** (1 / 7) + 9 / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7)
    assert karras_sigmas(1.0, 0.1, 4, rho=1.0) == pytest.approx([1.0, 0.7, 0.4, 0.1])
    separator = DiffusionSeparator(GaussianPrior(MEANS, STDS), mixing_weights("mean", 4), 1.0, 0.1, steps=4, rho=1.0)
    assert separator.sigmas == pytest.approx([1.0, 0.7, 0.4, 0.1, 0.0])  # the last step goes to 0
    with pytest.raises(ValueError, match="sigma_max > sigma_min > 0"):
        karras_sigmas(0.1, 1.0, 10)


@pytest.mark.parametrize("constraint", ["dirac", "projected"])
@pytest.mark.parametrize("weights", ["mean", UNEVEN])
def test_exact_constraint_samplers_match_the_exact_posterior(weights, constraint):
    alpha = mixing_weights("mean", 4) if weights == "mean" else mixing_weights(None, 4, weights)
    mix = gaussian_mixture(alpha, seed=1)
    prior = GaussianPrior(MEANS, STDS)
    separator = DiffusionSeparator(prior, alpha, **dict(DIRAC, constraint=constraint))
    samples, trace = separator(mix, n_chains=8, seeds=[1])
    # m = g(x) exactly is the limit gamma -> 0; at gamma = 1e-4 the difference is ~gamma^2 / std^2.
    assert_matches_posterior(samples[0], *prior.posterior(mix[0], alpha, gamma=1e-4))
    assert trace["mix_error"].shape == (1, separator.n_steps) and trace["mix_error"].max() < 1e-10
    assert torch.isnan(trace["loglik"]).all()


def test_gaussian_constraint_matches_the_exact_posterior():
    alpha = mixing_weights("mean", 4)
    mix = gaussian_mixture(alpha, seed=2)
    prior = GaussianPrior(MEANS, STDS)
    separator = DiffusionSeparator(prior, alpha, **GAUSSIAN)
    samples, trace = separator(mix, n_chains=8, seeds=[2])
    # The Langevin steps sample p_{sigma_min}(x) N(m; g(x), sigma_min^2); the noise in the prior and the
    # last step to 0 only change the variances by ~sigma_min^2 / std^2 = 1 %.
    assert_matches_posterior(samples[0], *prior.posterior(mix[0], alpha, gamma=GAUSSIAN["sigma_min"]))
    # ||m - g(x)||^2 / T is of the order gamma^2 = sigma_min^2 at the end, far below the start.
    residual = mix - (alpha.view(1, -1, 1) * samples[0]).sum(dim=1)
    assert residual.pow(2).mean() < 2 * GAUSSIAN["sigma_min"] ** 2, residual.pow(2).mean()
    assert trace["mix_error"][0, -1] < 2 * GAUSSIAN["sigma_min"] ** 2 < 1e-3 * trace["mix_error"][0, 0]


@pytest.mark.parametrize("constraint", ["dirac", "projected"])
@pytest.mark.parametrize("init", ["noise", "mixture"])
@pytest.mark.parametrize("mixing", ["mean", "sum"])
def test_exact_constraint_estimates_add_up_to_the_mixture(mixing, init, constraint):
    alpha = mixing_weights(mixing, 4)
    mix = torch.cat([gaussian_mixture(alpha, 256, seed=s) for s in range(2)])
    config = dict(sigma_max=1.0, sigma_min=1e-3, steps=20, s_churn=4, corrections=2, langevin_steps=3, langevin_eta=0.1,
                  constraint=constraint)
    separator = DiffusionSeparator(GaussianPrior(MEANS, STDS), alpha, init=init, **config)
    samples, trace = separator(mix, n_chains=3, seeds=[0, 1])
    assert torch.allclose((alpha.view(1, 1, -1, 1) * samples).sum(dim=2), mix.unsqueeze(1), atol=1e-5)
    assert trace["mix_error"].max() < 1e-10  # before every step too


def test_chains_are_reproducible_and_independent_of_batching():
    alpha = mixing_weights("mean", 4)
    mixes = torch.cat([gaussian_mixture(alpha, 256, seed=s) for s in range(2)])
    for constraint in ("dirac", "projected", "gaussian"):
        separator = DiffusionSeparator(GaussianPrior(MEANS, STDS), alpha, sigma_max=1.0, sigma_min=1e-2, steps=5,
                                       s_churn=10, corrections=1, langevin_steps=2, constraint=constraint)
        together, _ = separator(mixes, n_chains=3, seeds=[10, 11])
        alone, _ = separator(mixes[1:], n_chains=3, seeds=[11])
        again, _ = separator(mixes[1:], n_chains=3, seeds=[11])
        assert torch.allclose(together[1], alone[0], atol=1e-5)
        assert torch.equal(alone, again)
        assert not torch.allclose(together[0, 0], together[0, 1])  # chains differ


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_a_non_finite_score_skips_the_step_and_is_counted(solver):
    class Exploding(GaussianPrior):
        def score(self, x, sigma):
            out = super().score(x, sigma)
            return torch.cat([out[:1] * math.inf, out[1:]])  # the first chain only

    alpha = mixing_weights("mean", 4)
    mix = gaussian_mixture(alpha, 64)
    config = dict(sigma_max=1.0, sigma_min=1e-2, steps=3, solver=solver)
    separator = DiffusionSeparator(Exploding(MEANS, STDS), alpha, **config)
    samples, _ = separator(mix, n_chains=2, seeds=[0])
    assert torch.isfinite(samples).all()
    assert separator.nonfinite_steps == separator.score_evaluations == (3 if solver == "euler" else 5)
    # The healthy chain is untouched; the broken one never moved from its start (sigma_max noise).
    healthy, _ = DiffusionSeparator(GaussianPrior(MEANS, STDS), alpha, **config)(mix, n_chains=2, seeds=[0])
    assert torch.allclose(samples[0, 1], healthy[0, 1]) and separator.nonfinite_steps > 0
    start = torch.randn((2, 4, 64), generator=torch.Generator().manual_seed(0))[0, :3]
    assert torch.allclose(samples[0, 0, :3], start, atol=1e-6)


@pytest.mark.parametrize("churn", [0.0, 1.0])
@pytest.mark.parametrize("solver", ["euler", "heun", "heun, second call non-finite"])
@pytest.mark.parametrize("constraint", ["dirac", "gaussian"])
def test_steps_match_a_hand_computation(constraint, solver, churn):
    """Two steps sigma 0.8 -> 0.3 -> 0 of dx = -sigma * posterior_score dsigma, written out by hand."""

    class Linear(torch.nn.Module):  # the score of N(c_k, 1) convolved with N(0, sigma^2)
        centers = torch.tensor([0.5, -1.0, 2.0]).view(1, -1, 1)
        calls = 0

        def score(self, x, sigma):
            self.calls += 1
            broken = solver.endswith("non-finite") and self.calls == 2
            return -(x - self.centers) / (1 + sigma**2) * (math.inf if broken else 1)

    alpha, seed, (s0, s1) = torch.tensor([0.3, 0.7, 1.2]), 5, (0.8, 0.3)
    mix = torch.randn(1, 16)
    separator = DiffusionSeparator(Linear(), alpha, sigma_max=s0, sigma_min=s1, steps=2, solver=solver.split(",")[0],
                                   constraint=constraint, gamma_scale=0.5, s_churn=churn)
    x2, _ = separator(mix, n_chains=2, seeds=[seed])
    assert separator.nonfinite_steps == (2 if solver.endswith("non-finite") else 0)

    def post(x, sigma):
        score = -(x - Linear.centers) / (1 + sigma**2)
        if constraint == "gaussian":
            residual = mix - (alpha.view(1, -1, 1) * x).sum(dim=1, keepdim=True)
            return score + alpha.view(1, -1, 1) * residual / (0.5 * sigma) ** 2
        free = score[:, :2] - (alpha[:2] / alpha[2]).view(1, -1, 1) * score[:, 2:]
        return torch.cat([free, torch.zeros_like(score[:, 2:])], dim=1)

    def last_from_mix(x):
        if constraint == "gaussian":
            return x
        last = (mix - alpha[0] * x[:, 0] - alpha[1] * x[:, 1]) / alpha[2]
        return torch.stack([x[:, 0], x[:, 1], last], dim=1)

    # The same draws as the sampler: the start, then the churn noise of each step (gamma capped at
    # sqrt(2) - 1, so sigma_hat = sqrt(2) sigma and the added variance is sigma^2).
    generator = torch.Generator().manual_seed(seed)
    draw = lambda: torch.randn((2, 3, 16), generator=generator)  # noqa: E731
    x0 = last_from_mix(s0 * draw())
    h0, h1 = (s0 * math.sqrt(2), s1 * math.sqrt(2)) if churn else (s0, s1)
    if churn:
        x0 = last_from_mix(x0 + s0 * draw())
    d0 = -h0 * post(x0, h0)
    x1 = x0 + (s1 - h0) * d0
    if solver == "heun":
        x1 = x0 + (s1 - h0) * (d0 - s1 * post(last_from_mix(x1), s1)) / 2
    x1 = last_from_mix(x1)
    if churn:
        x1 = last_from_mix(x1 + s1 * draw())
    expected = last_from_mix(x1 + (0 - h1) * (-h1 * post(x1, h1)))  # the last step: Euler to 0
    assert torch.allclose(x2[0], expected, atol=1e-5)


@pytest.mark.parametrize("derived", [0, 1, "rotate"])
def test_any_derived_source_follows_the_hand_computation(derived):
    """Heun with churn, sigma 0.8 -> 0.3 -> 0, the Dirac constraint deriving another source than the last (rotate:
    chain 0 derives source 2, chain 1 source 1), written out by hand with the chain rule through x_d."""
    centers = torch.tensor([0.5, -1.0, 2.0]).view(1, -1, 1)

    class Linear(torch.nn.Module):  # the score of N(c_k, 1) convolved with N(0, sigma^2)
        def score(self, x, sigma):
            return -(x - centers) / (1 + sigma**2)

    alpha, seed, (s0, s1) = torch.tensor([0.3, 0.7, 1.2]), 5, (0.8, 0.3)
    mix = torch.randn(1, 16)
    separator = DiffusionSeparator(Linear(), alpha, sigma_max=s0, sigma_min=s1, steps=2, solver="heun", s_churn=1.0,
                                   dirac_derived=derived)
    x2, _ = separator(mix, n_chains=2, seeds=[seed])
    chains_derive = [2, 1] if derived == "rotate" else [derived, derived]
    free = torch.ones(2, 3, 1)
    for chain, d in enumerate(chains_derive):
        free[chain, d] = 0

    def post(x, sigma):
        score = -(x - centers) / (1 + sigma**2)
        derived_score = torch.stack([score[c, d] for c, d in enumerate(chains_derive)]).unsqueeze(1)
        derived_alpha = alpha[chains_derive].view(-1, 1, 1)
        return (score - alpha.view(1, -1, 1) / derived_alpha * derived_score) * free

    def derive(x):
        x = x.clone()
        for c, d in enumerate(chains_derive):
            rest = sum(alpha[k] * x[c, k] for k in range(3) if k != d)
            x[c, d] = (mix[0] - rest) / alpha[d]
        return x

    generator = torch.Generator().manual_seed(seed)
    draw = lambda: torch.randn((2, 3, 16), generator=generator) * free  # noqa: E731
    x0 = derive(s0 * draw())
    h0, h1 = s0 * math.sqrt(2), s1 * math.sqrt(2)  # churn: gamma capped at sqrt(2) - 1
    x0 = derive(x0 + s0 * draw())
    d0 = -h0 * post(x0, h0)
    x1 = derive(x0 + (s1 - h0) * d0)
    x1 = derive(x0 + (s1 - h0) * (d0 - s1 * post(x1, s1)) / 2)
    x1 = derive(x1 + s1 * draw())
    expected = derive(x1 + (0 - h1) * (-h1 * post(x1, h1)))
    assert torch.allclose(x2[0], expected, atol=1e-5)


class Flat(torch.nn.Module):
    """A zero score: only the noise the sampler injects moves the chains."""

    def score(self, x, sigma):
        return torch.zeros_like(x)


def test_with_a_flat_score_only_the_injected_noise_moves_the_free_sources():
    """Zero score: the free sources end at the start plus every noise the sampler adds, which has variance

    sigma_max^2 + s_noise^2 sum (sigma_hat^2 - sigma^2)     (churn: every step, corrections' redos too)
                + corrections * (sigma_0^2 - sigma_min^2)  (re-noising, on the moves between positive levels)
                + langevin_steps * 2 * langevin_eta * sigma_min^2.
    """

    alpha = torch.tensor(UNEVEN)
    mix = gaussian_mixture(alpha, 4096)
    # Levels 1, 0.75, 0.5, then 0; churn gamma = 0.6 / 3 = 0.2 at every level.
    separator = DiffusionSeparator(Flat(), alpha, sigma_max=1.0, sigma_min=0.5, steps=3, rho=1.0, s_churn=0.6,
                                   s_noise=0.8, corrections=2, langevin_steps=2, langevin_eta=1.0, init="mixture")
    samples, _ = separator(mix, n_chains=8, seeds=[3])
    variance = 1.0 + 0.8**2 * (1.2**2 - 1) * (3 * 1 + 3 * 0.75**2 + 0.5**2) + 2 * (1 - 0.5**2) + 2 * 2 * 0.5**2
    start = mix[0] / (4 * alpha.view(-1, 1))  # the Average baseline
    deviation = samples[0, :, :3] - start[:3]
    assert deviation.pow(2).mean().item() == pytest.approx(variance, rel=0.03)
    assert torch.allclose((alpha.view(1, -1, 1) * samples[0]).sum(dim=1), mix, atol=1e-4)

    # No churn and a tiny sigma_max: the estimates stay at the Average baseline m / (N alpha_k).
    still = DiffusionSeparator(Flat(), alpha, sigma_max=1e-4, sigma_min=1e-5, steps=3, init="mixture")
    samples, _ = still(mix, n_chains=2, seeds=[3])
    assert torch.allclose(samples[0], start.expand(2, -1, -1), atol=1e-3)


def test_a_variational_start_is_the_posterior_sample_noised_to_sigma_max():
    """separation.init=variational: the chains start at the initializer's sample plus N(0, sigma_max^2) on the
    free sources (the derived one follows from the mixture); a zero score keeps them there."""

    alpha = torch.tensor(UNEVEN)
    mix = gaussian_mixture(alpha, 4096)
    start = 0.3 * torch.randn(2, 4, 4096, generator=torch.Generator().manual_seed(5))  # [B * C, N, T]
    calls = []

    def posterior_sample(mix_, n_chains, seeds):
        calls.append((n_chains, list(seeds)))
        return start

    for sigma_max, spread in ((0.4, 0.4), (1e-4, 0.0)):
        separator = DiffusionSeparator(Flat(), alpha, sigma_max=sigma_max, sigma_min=sigma_max / 4, steps=3)
        separator.initializer = posterior_sample
        samples, _ = separator(mix, n_chains=2, seeds=[7])
        deviation = samples[0, :, :3] - start[:, :3]
        assert deviation.std().item() == pytest.approx(spread, abs=0.01)
        assert deviation.mean().abs().item() < 0.01
        assert torch.allclose((alpha.view(1, -1, 1) * samples[0]).sum(dim=1), mix, atol=1e-4)
    assert calls == [(2, [7]), (2, [7])]


def test_trace_and_score_call_bookkeeping():
    alpha = mixing_weights("mean", 4)
    model = Counting(GaussianPrior(MEANS, STDS))
    separator = DiffusionSeparator(model, alpha, sigma_max=1.0, sigma_min=0.1, steps=3, rho=1.0,
                                   corrections=1, langevin_steps=2, s_churn=3.0, s_tmax=0.6)
    _, trace = separator(gaussian_mixture(alpha, 32), n_chains=2, seeds=[0])
    # Levels 1.0 -> 0.55 -> 0.1 -> 0: two moves with one correction each, two Langevin steps, the last step.
    assert separator.trace_sigmas == pytest.approx([1.0, 1.0, 0.55, 0.55, 0.1, 0.1, 0.1])
    assert trace["mix_error"].shape == trace["loglik"].shape == (1, separator.n_steps) == (1, 7)
    assert len(model.calls) == separator.score_evaluations == 2 * 2 * 2 + 2 + 1
    # Churn (gamma = 3/3 capped at sqrt(2) - 1) only where s_tmin <= sigma <= s_tmax; Heun's second call
    # is at the next level.
    assert model.calls[:4] == pytest.approx([1.0, 0.55, 1.0, 0.55])
    assert model.calls[4:8] == pytest.approx([0.55 * math.sqrt(2), 0.1] * 2)
    assert model.calls[8:] == pytest.approx([0.1, 0.1, 0.1 * math.sqrt(2)])  # Langevin: no churn


@pytest.mark.parametrize("bad, match", [
    (dict(sigma_min=2.0), "sigma_max > sigma_min"), (dict(steps=1), "steps >= 2"),
    (dict(solver="rk4"), "unknown solver"), (dict(constraint="soft"), "unknown constraint"),
    (dict(init="zeros"), "unknown init"), (dict(s_churn=-1), "must be >= 0"), (dict(corrections=-1), "must be >= 0"),
])
def test_invalid_arguments_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        DiffusionSeparator(GaussianPrior(MEANS, STDS), mixing_weights("mean", 4), **bad)


def test_scaled_last_sigma_asks_the_derived_source_at_its_own_noise_level():
    """dirac_last_sigma=scaled: the derived source's score is asked at sigma sqrt(sum_{k != d} (alpha_k / alpha_d)^2),
    per chain when each chain derives another source (rotate), and every other source at sigma."""

    class Recording(GaussianPrior):
        noise_conditional = True

        def __init__(self, *args):
            super().__init__(*args)
            self.levels = []

        def score(self, x, sigma):
            self.levels.append(sigma)
            return super().score(x, sigma)

    alpha = torch.tensor([0.2, 0.4, 0.4, 0.8])
    prior = Recording(MEANS, STDS)
    separator = DiffusionSeparator(prior, alpha, sigma_max=1.0, sigma_min=0.1, steps=2, solver="euler",
                                   dirac_last_sigma="scaled", dirac_derived="rotate")
    separator(gaussian_mixture(alpha, 16), n_chains=2, seeds=[0])
    level = prior.levels[0]  # at sigma_max = 1: chain 0 derives source 3, chain 1 source 2
    expected = torch.ones(2, 4)
    expected[0, 3] = ((0.2**2 + 0.4**2 + 0.4**2) / 0.8**2) ** 0.5
    expected[1, 2] = ((0.2**2 + 0.4**2 + 0.8**2) / 0.4**2) ** 0.5
    torch.testing.assert_close(level, expected)
