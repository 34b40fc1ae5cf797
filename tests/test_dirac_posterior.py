"""The variational posterior under the Dirac mixture likelihood (posterior.derived)."""
import pytest
import torch

from lightning_modules.nn.dirac_posterior import DiracPosterior
from lightning_modules.nn.elbo import elbo_terms
from lightning_modules.nn.gaussian_prior import GaussianPrior
from lightning_modules.nn.posterior_net import Normal
from lightning_modules.posterior_module import PosteriorModule
from tests.test_variational import fit_on_mixtures, tiny_posterior


def test_samples_sum_to_the_mixture_and_the_derived_source_has_no_entropy():
    alpha = torch.tensor([0.2, 0.3, 0.5])
    mix = 0.3 * torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    base = tiny_posterior(3)(mix, alpha)
    q = DiracPosterior(base, mix, alpha, derived=1)
    samples = q.rsample(torch.rand(5, 2, 3, 32, generator=torch.Generator().manual_seed(1)))  # [C, B, N, T]
    assert torch.allclose((alpha.view(1, 1, 3, 1) * samples).sum(dim=2), mix.expand(5, -1, -1), atol=1e-6)
    assert torch.equal(samples[:, :, [0, 2]], base.rsample(torch.rand(5, 2, 3, 32, generator=torch.Generator()
                                                                      .manual_seed(1)))[:, :, [0, 2]].float())
    assert torch.allclose((alpha.view(1, 3, 1) * q.mean).sum(dim=1), mix, atol=1e-6)
    entropy = q.entropy()
    assert (entropy[:, 1] == 0).all() and torch.equal(entropy[:, [0, 2]], base.entropy()[:, [0, 2]])


def test_the_mean_and_variance_match_monte_carlo():
    alpha = torch.tensor([0.5, 0.25, 0.25])
    mix = torch.tensor([[0.2, -0.4, 0.1]])
    base = Normal(torch.tensor([[[0.1, 0.0, -0.3], [0.2, 0.1, 0.0], [0.0, 0.3, 0.2]]]),
                  torch.tensor([[[0.1, 0.2, 0.3], [0.3, 0.1, 0.2], [0.2, 0.2, 0.1]]]))
    q = DiracPosterior(base, mix, alpha, derived=0)
    draws = q.rsample(torch.rand(200000, 1, 3, 3, generator=torch.Generator().manual_seed(2)))
    assert torch.allclose(draws.mean(dim=0), q.mean, atol=5e-3)
    assert torch.allclose(draws.var(dim=0), q.variance, rtol=0.03)


def test_the_elbo_has_no_mixture_term_and_the_derived_prior_reaches_the_free_sources():
    alpha = torch.tensor([0.5, 0.5])
    mix = 0.4 * torch.sin(torch.linspace(0, 12, 64)).unsqueeze(0)
    net = tiny_posterior(2)
    q = DiracPosterior(net(mix, alpha), mix, alpha, derived=1)
    prior = GaussianPrior([0.0, 0.0], [1.0, 0.01])  # only the derived source's prior is sharp
    terms = elbo_terms(q, prior, mix, alpha, 0.05, torch.rand(1, 2, 64, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(terms["mixture"], torch.zeros(1))
    terms["prior"][:, 1].sum().backward()  # the derived source's prior term alone
    assert net.encoder.end_out.conv.weight.grad.abs().sum() > 0


def test_training_finds_the_closed_form_posterior_on_the_constraint():
    """Gaussian priors under alpha_a s_a + alpha_b s_b = m: s_a | m is Gaussian with precision
    1/v_a + alpha_a^2 / (alpha_b^2 v_b), so mean-field VI over the one free source is exact."""
    means, stds, alpha = torch.tensor([0.2, -0.3]), torch.tensor([0.25, 0.4]), torch.tensor([0.5, 0.5])
    prior = GaussianPrior(means.tolist(), stds.tolist())
    torch.manual_seed(0)
    module = PosteriorModule(net={"width": 16, "n_layers": 3, "distribution": "normal", "init_scale": 0.2},
                             sources=["a", "b"], alpha=alpha.tolist(), derived="b", prior=prior)
    generator = torch.Generator().manual_seed(0)

    def mixtures(n):
        s = means.view(1, 2, 1) + stds.view(1, 2, 1) * torch.randn(n, 2, 96, generator=generator)
        return (alpha.view(1, 2, 1) * s).sum(dim=1)

    fit_on_mixtures(module, mixtures, generator)
    mix = mixtures(8)
    with torch.no_grad():
        q = module.posterior(mix)
    (va, vb), (ma, mb), (aa, ab) = stds**2, means, alpha
    precision = 1 / va + aa**2 / (ab**2 * vb)
    mean_a = (ma / va + aa * (mix - ab * mb) / (ab**2 * vb)) / precision
    inner = slice(8, -8)
    error = (q.mean[:, 0] - mean_a)[:, inner]
    start = (mix / (2 * aa) - mean_a)[:, inner]  # the Average baseline it started from
    assert error.pow(2).mean().sqrt() < 0.1 * start.pow(2).mean().sqrt()
    assert torch.allclose(q.base.scale[:, 0, inner].mean(), precision.rsqrt(), rtol=0.1)
    assert torch.allclose((alpha.view(1, 2, 1) * q.mean).sum(dim=1), mix, atol=1e-5)


def test_an_unknown_derived_source_is_refused():
    with pytest.raises(ValueError, match="posterior.derived='c' is not one of the posterior's sources"):
        PosteriorModule(net={"width": 8, "n_layers": 2}, sources=["a", "b"], alpha=[0.5, 0.5], derived="c")
