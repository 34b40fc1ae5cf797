"""The Langevin samplers against an analytic Gaussian prior, whose posterior is known in closed form, and the
score contract they call: an analytic score and a LevelScore of likelihood priors agree, and a flow's score
is the autograd gradient of its log-density at the level nearest the one asked for."""
import math

import pytest
import torch

from lightning_modules.samplers.langevin import LangevinSeparator, basis_levels, sgld_levels
from lightning_modules.samplers.mixing import mixing_weights
from lightning_modules.samplers.level_score import LevelScore
from lightning_modules.nn.flowavenet import FloWaveNet, FlowConfig
from lightning_modules.nn.gaussian_prior import GaussianPrior

MEANS, STDS = [0.2, -0.1, 0.0, 0.3], [0.1, 0.15, 0.2, 0.12]
BASIS_SIGMAS = torch.logspace(0, -2, 10).tolist()


def gaussian_mixture(alpha, length=1024, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sources = torch.tensor(MEANS).view(-1, 1) + torch.tensor(STDS).view(-1, 1) * torch.randn(4, length, generator=generator)
    return (alpha.view(-1, 1) * sources).sum(dim=0, keepdim=True)  # [1, T]


def empirical_moments(samples, exact_means):
    """samples [C, N, T]: mean and covariance of the deviation from the exact posterior mean."""
    deviation = samples.double() - exact_means
    count = deviation.shape[0] * deviation.shape[2]
    return deviation.mean(dim=(0, 2)), torch.einsum("cnt,cmt->nm", deviation, deviation) / count


def fine_tuned_levels(sigmas):
    """The likelihood family's way: one prior per noise level, each the clean Gaussian widened by its sigma."""
    return LevelScore([(s, GaussianPrior(MEANS, STDS, noise_sigma=s)) for s in sigmas])


@pytest.mark.parametrize("mixing", ["mean", "sum"])
def test_basis_matches_the_exact_posterior_at_the_end_of_annealing(mixing):
    alpha = mixing_weights(mixing, 4)
    mix = gaussian_mixture(alpha)
    separator = LangevinSeparator(GaussianPrior(MEANS, STDS), basis_levels(BASIS_SIGMAS, delta=2e-5, steps=100), alpha)
    samples, trace = separator(mix, n_chains=8, seeds=[0])
    # The last level targets p_{sigma_L}(x) N(m; g(x), sigma_L^2).
    last = GaussianPrior(MEANS, STDS, noise_sigma=BASIS_SIGMAS[-1])
    exact_means, exact_cov = last.posterior(mix[0], alpha, gamma=BASIS_SIGMAS[-1])
    bias, cov = empirical_moments(samples[0], exact_means)
    scale = exact_cov.diagonal().sqrt()
    assert (bias.abs() < 0.05 * scale).all(), (bias, scale)
    # Annealing freezes the slowest directions a little above the target: within 15 %.
    assert torch.allclose(cov.diagonal(), exact_cov.diagonal(), rtol=0.15), (cov.diagonal(), exact_cov.diagonal())
    # The mixture constraint is met: ||m - g(x)||^2 / T is of the order gamma_L^2, far below where it started.
    residual = mix - (alpha.view(1, -1, 1) * samples[0]).sum(dim=1)
    assert residual.pow(2).mean() < 2 * BASIS_SIGMAS[-1] ** 2, residual.pow(2).mean()
    assert trace["mix_error"][0, -1] < 0.01 * trace["mix_error"][0, 0]
    # An analytic score keeps no log-likelihood: the trace says so rather than inventing one.
    assert trace["loglik"].shape == (1, 1000) and trace["loglik"].isnan().all()
    assert separator.trace_sigmas == [s for s in BASIS_SIGMAS for _ in range(100)] and separator.n_steps == 1000


def test_analytic_score_and_fine_tuned_likelihood_levels_give_the_same_basis_run():
    alpha = mixing_weights("mean", 4)
    mix = gaussian_mixture(alpha, length=128, seed=2)
    sigmas = [1.0, 0.3, 0.1]
    levels = basis_levels(sigmas, delta=2e-4, steps=20)
    analytic, analytic_trace = LangevinSeparator(GaussianPrior(MEANS, STDS), levels, alpha)(mix, 2, [3])
    separator = LangevinSeparator(fine_tuned_levels(sigmas), levels, alpha)
    tuned, tuned_trace = separator(mix, 2, [3])
    assert torch.allclose(analytic, tuned, atol=1e-4), (analytic - tuned).abs().max()
    assert torch.allclose(analytic_trace["mix_error"], tuned_trace["mix_error"], rtol=1e-4)
    # The likelihood levels keep their log-likelihood curve: the level's prior at the chain before each step.
    assert torch.isfinite(tuned_trace["loglik"]).all()
    final = separator.score_model.priors[-1].log_prob(tuned[0]).mean()
    assert tuned_trace["loglik"][0, -1] == pytest.approx(final.item(), abs=0.1)


def test_analytic_score_equals_the_gradient_of_the_widened_log_density():
    x = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(0))
    for sigma in (1.0, 0.077, 0.01):
        expected = fine_tuned_levels([sigma]).score(x, sigma)
        # At sigma = 0.01 the scores reach a few hundred: float32 autograd agrees to about 1e-4 there.
        assert torch.allclose(GaussianPrior(MEANS, STDS).score(x, sigma), expected, rtol=1e-4, atol=1e-3)


def tiny_flow(seed):
    torch.manual_seed(seed)
    flow = FloWaveNet(2, FlowConfig(n_blocks=1, n_flows=2, n_layers=2, width=8))
    with torch.no_grad():  # away from the identity-like initialisation, so two flows differ
        for parameter in flow.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return flow.eval()


def test_a_flows_score_is_the_gradient_of_its_total_log_density_at_the_nearest_level():
    coarse, fine = tiny_flow(0), tiny_flow(1)
    x = 0.3 * torch.randn(2, 2, 64, generator=torch.Generator().manual_seed(0))

    def autograd_score(flow):
        x_in = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(flow.log_prob(x_in).sum() * x.shape[-1], x_in)
        return grad

    one = LevelScore([(0.1, fine)])
    score = one.score(x, 0.1)
    assert score.shape == x.shape and not x.requires_grad
    assert torch.allclose(score, autograd_score(fine), atol=1e-5)
    assert torch.allclose(one.last_log_prob, fine.log_prob(x).detach())
    with torch.no_grad():  # separate_file's caller: the score still needs autograd inside
        assert torch.allclose(one.score(x, 0.1), score)
    expected = {"coarse": autograd_score(coarse), "fine": autograd_score(fine)}
    assert not torch.allclose(expected["coarse"], expected["fine"], atol=1e-3)
    two = LevelScore([(0.3, coarse), (0.03, fine)])
    # Nearest in log-sigma, around the geometric midpoint 0.0949: 0.1 goes to 0.3, 0.09 to 0.03.
    for sigma, served_by in ((0.3, "coarse"), (0.03, "fine"), (0.1, "coarse"), (0.09, "fine"), (0.05, "fine"),
                             (0.0, "fine"), (torch.tensor(0.3), "coarse")):
        assert torch.allclose(two.score(x, sigma), expected[served_by], atol=1e-5), (sigma, served_by)
    assert torch.allclose(two.log_prob(x), fine.log_prob(x))  # the smallest sigma's prior


def test_sgld_samples_the_exact_posterior():
    alpha = mixing_weights("mean", 4)
    mix = gaussian_mixture(alpha, seed=1)
    gamma = 0.05
    prior = GaussianPrior(MEANS, STDS)
    # The noiseless level through the likelihood path (the analytic score divides by sigma^2).
    separator = LangevinSeparator(LevelScore([(0.0, prior)]), sgld_levels(eta=2e-4, gamma=gamma, steps=3000), alpha)
    samples, _ = separator(mix, n_chains=8, seeds=[1])
    exact_means, exact_cov = prior.posterior(mix[0], alpha, gamma)
    bias, cov = empirical_moments(samples[0], exact_means)
    assert (bias.abs() < 0.05 * exact_cov.diagonal().sqrt()).all()
    assert torch.allclose(cov, exact_cov, atol=0.1 * exact_cov.diagonal().min()), (cov, exact_cov)


def test_basis_schedule_and_mixing_constants():
    levels = basis_levels([1.0, 0.1, 0.01], delta=2e-5, steps=7)
    assert [lv.eta for lv in levels] == pytest.approx([0.2, 2e-3, 2e-5])
    assert [lv.gamma for lv in levels] == [1.0, 0.1, 0.01]
    # eta / gamma^2 is the same at every level: delta / sigma_L^2.
    assert {round(lv.eta / lv.gamma**2, 12) for lv in levels} == {0.2}
    assert mixing_weights("mean", 4).tolist() == [0.25] * 4
    assert mixing_weights("sum", 3).tolist() == [1.0] * 3
    with pytest.raises(ValueError, match="largest to smallest"):
        basis_levels([0.01, 1.0])
    with pytest.raises(ValueError, match="unknown mixing"):
        mixing_weights("median", 2)


def test_one_step_adds_the_gradient_of_the_gaussian_mixture_likelihood():
    """With a flat prior, one sampler step is x0 + sqrt(2 eta) eps + eta * grad_x log N(m; g(x0), gamma^2 I)."""

    class Flat(torch.nn.Module):
        def log_prob(self, x):
            return 0.0 * x.sum(dim=2)

    alpha = torch.tensor([0.3, 0.7])
    gamma, eta, seed = 0.5, 1e-3, 7
    mix = torch.randn(1, 16)
    separator = LangevinSeparator(LevelScore([(0.0, Flat())]), sgld_levels(eta, gamma, steps=1), alpha)
    x1, _ = separator(mix, n_chains=2, seeds=[seed])
    # The same draws as the sampler: the start, then the step's noise, from the mixture's generator.
    generator = torch.Generator().manual_seed(seed)
    x0 = (2 * torch.rand((2, 2, 16), generator=generator) - 1).requires_grad_(True)
    noise = torch.randn((2, 2, 16), generator=generator)
    log_likelihood = -((mix - (alpha.view(1, -1, 1) * x0).sum(dim=1)) ** 2).sum() / (2 * gamma**2)
    (grad,) = torch.autograd.grad(log_likelihood, x0)
    expected = x0.detach() + math.sqrt(2 * eta) * noise + eta * grad
    assert torch.allclose(x1[0], expected, atol=1e-6)


def test_chains_are_reproducible_and_independent_of_batching():
    alpha = mixing_weights("mean", 4)
    mixes = torch.cat([gaussian_mixture(alpha, 256, seed=s) for s in range(2)])
    separator = LangevinSeparator(fine_tuned_levels([1.0, 0.1]), basis_levels([1.0, 0.1], steps=5), alpha)
    together, _ = separator(mixes, n_chains=3, seeds=[10, 11])
    alone, _ = separator(mixes[1:], n_chains=3, seeds=[11])
    assert torch.allclose(together[1], alone[0], atol=1e-6)
    assert not torch.allclose(together[0, 0], together[0, 1])  # chains differ


def test_a_diverging_prior_gradient_skips_the_step_instead_of_poisoning_the_chain():
    class Exploding(GaussianPrior):
        def log_prob(self, x):
            out = super().log_prob(x)
            return out + (x[:, :1, :1].sum() * math.inf if x.shape[0] else 0)

    alpha = mixing_weights("mean", 4)
    separator = LangevinSeparator(LevelScore([(0.0, Exploding(MEANS, STDS))]), sgld_levels(1e-4, 0.1, 3), alpha)
    samples, _ = separator(gaussian_mixture(alpha, 64), n_chains=2, seeds=[0])
    assert torch.isfinite(samples).all() and separator.nonfinite_steps == 6


def test_a_source_subset_forwards_the_score_contract_only_where_the_family_has_it():
    from lightning_modules.nn.source_subset import SourceSubset

    class WithSelection(GaussianPrior):
        noise_conditional = True

        def selection_score(self, x):
            return -(x - self.means.view(1, -1, 1)).pow(2).mean(dim=2)

    everything, kept = ["a", "b", "c", "d"], ["d", "b"]
    family = WithSelection(MEANS, STDS)
    subset = SourceSubset(family, everything, kept)
    alone = GaussianPrior([MEANS[3], MEANS[1]], [STDS[3], STDS[1]])
    x = torch.randn(2, 2, 16)
    assert torch.allclose(subset.score(x, 0.3), alone.score(x, 0.3))
    assert torch.allclose(subset.denoise(x, 0.3), alone.denoise(x, 0.3))
    full = torch.zeros(2, 4, 16)
    full[:, [3, 1]] = x
    assert torch.allclose(subset.selection_score(x), family.selection_score(full)[:, [3, 1]])
    assert subset.noise_conditional
    # A likelihood family has none of them: callers' getattr(..., None) falls back to log_prob.
    plain = SourceSubset(tiny_flow(0), ["a", "b"], ["b"])
    assert not plain.noise_conditional and plain.length_multiple == 2
    for name in ("score", "denoise", "selection_score"):
        assert getattr(plain, name, None) is None
