"""The variational posterior's parts: the bounded distribution, the ELBO terms, training against Gaussian priors
(whose posterior is known in closed form), and mixtures-only training data."""
import math

import pytest
import torch

from datamodules.mixtures_only import MixtureDataModule, MixturesOnly
from datamodules.toy import ToyDataModule
from lightning_modules.nn.elbo import elbo_terms
from lightning_modules.nn.gaussian_prior import GaussianPrior
from lightning_modules.nn.posterior_net import PosteriorNet, PosteriorNetConfig
from lightning_modules.nn.truncated_normal import TruncatedNormal
from lightning_modules.posterior_module import PosteriorModule

# Inside, at the edges, wide and narrow: (loc, scale).
CASES = [(0.0, 0.3), (0.9, 0.5), (-1.0, 0.01), (0.5, 3.0), (1.0, 1e-3), (-0.4, 0.05)]


def numeric(d, grid):
    density = d.log_prob(grid).double().exp()
    return lambda f: torch.trapezoid(density * f, grid, dim=0)


def test_truncated_normal_density_integrates_to_one_with_its_moments_and_entropy():
    loc, scale = (torch.tensor(v, dtype=torch.float64) for v in zip(*CASES))
    d = TruncatedNormal(loc, scale)
    grid = torch.linspace(-1, 1, 400_001, dtype=torch.float64).unsqueeze(1)
    integrate = numeric(d, grid)
    assert torch.allclose(integrate(torch.ones_like(grid)), torch.ones(len(CASES), dtype=torch.float64), atol=2e-4)
    mean = integrate(grid)
    assert torch.allclose(d.mean, mean, atol=1e-4)
    assert torch.allclose(d.variance, integrate((grid - mean) ** 2), rtol=1e-3, atol=1e-7)
    assert torch.allclose(d.entropy(), integrate(-d.log_prob(grid).double()), atol=2e-3)
    outside = torch.tensor([[-1.01], [1.2]], dtype=torch.float64)
    assert torch.isinf(d.log_prob(outside)).all()


def test_truncated_normal_samples_follow_its_cdf_and_carry_gradients():
    loc = torch.tensor([0.2, 0.95, -0.99], requires_grad=True)
    scale = torch.tensor([0.4, 0.1, 0.02], requires_grad=True)
    d = TruncatedNormal(loc, scale)
    u = torch.rand(100_000, 3, generator=torch.Generator().manual_seed(0))
    x = d.rsample(u)
    assert x.min() >= -1 and x.max() <= 1
    # The sample's empirical CDF against the numeric CDF of the density, at a few points.
    grid = torch.linspace(-1, 1, 200_001, dtype=torch.float64).unsqueeze(1)
    density = d.log_prob(grid).detach().double().exp()
    cdf = torch.cumulative_trapezoid(density, grid, dim=0)
    for k in range(3):
        for q in (0.1, 0.5, 0.9):
            point = x[:, k].detach().double().quantile(q)
            index = int(torch.searchsorted(grid[1:, 0].contiguous(), point))
            assert abs(float(cdf[index, k]) - q) < 0.01
    x.sum().backward()
    assert torch.isfinite(loc.grad).all() and torch.isfinite(scale.grad).all() and (loc.grad > 0).all()


def tiny_posterior(n_sources, distribution="truncated_normal", seed=0):
    torch.manual_seed(seed)
    net = PosteriorNet(n_sources, PosteriorNetConfig(width=8, n_layers=3, distribution=distribution, init_scale=0.2))
    torch.nn.init.normal_(net.encoder.end_out.conv.weight, std=0.3)  # not the zero start: q varies with m
    return net


@pytest.mark.parametrize("distribution", ["truncated_normal", "normal"])
def test_elbo_terms_match_a_monte_carlo_estimate_by_hand(distribution):
    prior = GaussianPrior([0.1, -0.2], [0.3, 0.5])
    alpha, gamma = torch.tensor([0.5, 0.5]), 0.1
    mix = 0.4 * torch.sin(torch.linspace(0, 12, 64)).unsqueeze(0).repeat(2, 1)
    mix[1] *= -0.5
    with torch.no_grad():
        q = tiny_posterior(2, distribution)(mix, alpha)
        draws = 4000
        u = torch.rand(draws, 2, 2, 64, generator=torch.Generator().manual_seed(1))
        s = q.rsample(u)  # [draws, B, N, T]
        by_hand_prior = prior.log_prob(s.flatten(0, 1)).view(draws, 2, 2).mean(dim=0)
        by_hand_entropy = -q.log_prob(s).double().mean(dim=(0, 3))
        residual = mix - (alpha.view(1, 1, 2, 1) * s).sum(dim=2)
        by_hand_mixture = (-residual.pow(2) / (2 * gamma**2) - 0.5 * math.log(2 * math.pi * gamma**2)).mean(dim=(0, 2))
        terms = [elbo_terms(q, prior, mix, alpha, gamma, torch.rand(2, 2, 64, generator=torch.Generator().manual_seed(i)))
                 for i in range(200)]
    prior_term = torch.stack([t["prior"] for t in terms]).mean(dim=0)  # one-sample MC, averaged
    assert torch.allclose(prior_term, by_hand_prior, atol=0.03)
    assert torch.allclose(terms[0]["entropy"].double(), by_hand_entropy, atol=0.02)
    assert torch.allclose(terms[0]["mixture"], by_hand_mixture, rtol=0.02)
    elbo = prior_term.sum(dim=1) + terms[0]["entropy"].sum(dim=1) + terms[0]["mixture"]
    by_hand = by_hand_prior.sum(dim=1) + by_hand_entropy.float().sum(dim=1) + by_hand_mixture
    assert torch.allclose(elbo, by_hand, rtol=0.02)


def fit_on_mixtures(module, mixtures, generator, steps=400):
    """Adam on the module's ELBO objective, a fresh batch of 8 ``mixtures(8)`` per step."""
    optimizer = torch.optim.Adam(module.net.parameters(), lr=3e-3)
    for _ in range(steps):
        *_, objective = module.elbo(mixtures(8), generator)
        optimizer.zero_grad()
        (-objective.mean()).backward()
        optimizer.step()


def test_posterior_trained_against_gaussian_priors_finds_the_closed_form_posterior():
    """Mean-field Gaussian VI of a Gaussian posterior is exact in the mean; its variances are 1 / precision_kk."""
    prior = GaussianPrior([0.2, -0.3], [0.25, 0.4])
    alpha, gamma = [0.5, 0.5], 0.1
    torch.manual_seed(0)
    module = PosteriorModule(net={"width": 16, "n_layers": 3, "distribution": "normal", "init_scale": 0.2},
                             sources=["a", "b"], alpha=alpha, gamma=gamma, prior=prior)
    generator = torch.Generator().manual_seed(0)

    def mixtures(n):  # m = g(s) + N(0, gamma^2), s from the priors
        s = prior.means.view(1, 2, 1) + prior.variances.sqrt().view(1, 2, 1) * torch.randn(n, 2, 96, generator=generator)
        return (torch.tensor(alpha).view(1, 2, 1) * s).sum(dim=1) + gamma * torch.randn(n, 96, generator=generator)

    fit_on_mixtures(module, mixtures, generator)
    mix = mixtures(8)
    with torch.no_grad():
        q = module.posterior(mix)
    mean, covariance = prior.posterior(mix, alpha, gamma)
    inner = slice(8, -8)  # the zero-padded edges see less context
    error = (q.mean - mean.float())[..., inner]
    start = (mix.unsqueeze(1) - mean.float())[..., inner]  # the Average baseline it started from
    posterior_std = covariance.diagonal().sqrt().float().view(1, 2, 1)
    assert error.pow(2).mean().sqrt() < 0.1 * start.pow(2).mean().sqrt()
    assert (error.abs() / posterior_std).mean() < 0.15
    mean_field_std = torch.linalg.inv(covariance).diagonal().rsqrt().float()
    assert torch.allclose(q.scale[..., inner].mean(dim=(0, 2)), mean_field_std, rtol=0.1)


def test_training_batches_carry_mixtures_only_and_sources_are_refused():
    base = ToyDataModule(sources=["sine", "square"], crop_length=64, eval_length=64, batch_size=4, n_train=8,
                         n_val=4, n_test=4)
    datamodule = MixtureDataModule(base, [0.5, 0.5])
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch) == {"mix", "index"}
    toy = base.dataset("train")
    assert torch.equal(batch["mix"][0], toy[int(batch["index"][0])]["mix"])
    assert "sources" in next(iter(datamodule.val_dataloader()))  # validation monitors against references
    module = PosteriorModule(net={"width": 4, "n_layers": 2}, sources=["sine", "square"], alpha=[0.5, 0.5],
                             prior=GaussianPrior([0.0, 0.0], [0.5, 0.5]))
    with pytest.raises(ValueError, match="mixtures only"):
        module.training_step({"mix": batch["mix"], "sources": torch.zeros(4, 2, 64)}, 0)


class FakeFrames(torch.utils.data.Dataset):
    """Song s, frame f: every source is the constant s (so a mixture tells which songs it drew)."""
    frames_per_song = 3

    def __len__(self):
        return 4 * self.frames_per_song

    def __getitem__(self, index):
        song = index // self.frames_per_song
        return {"sources": torch.full((2, 5), float(song)), "mix": torch.zeros(5), "index": index}


def test_stem_mixtures_sum_stems_of_different_songs():
    torch.manual_seed(0)
    dataset = MixturesOnly(FakeFrames(), alpha=[1.0, 10.0], independent=True)
    for index in range(20):
        item = dataset[index]
        assert set(item) == {"mix", "index"}
        value = float(item["mix"][0])
        first, second = int(round(value)) % 10, int(round(value)) // 10  # 1 * song_a + 10 * song_b
        assert value == first + 10 * second and first != second


class FlakyPrior(GaussianPrior):
    """A Gaussian prior whose log-likelihood is NaN while ``broken``."""
    broken = False

    def log_prob(self, x):
        value = super().log_prob(x)
        return value * math.nan if self.broken else value


def test_a_non_finite_step_is_skipped_and_leaves_the_weights_alone():
    prior = FlakyPrior([0.0, 0.0], [0.5, 0.5])
    module = PosteriorModule(net={"width": 4, "n_layers": 2}, sources=["a", "b"], alpha=[0.5, 0.5], prior=prior)
    optimizer = torch.optim.Adam(module.net.parameters(), lr=1e-2)
    mix = 0.3 * torch.randn(2, 64, generator=torch.Generator().manual_seed(0))

    def step():
        loss = module.training_step({"mix": mix, "index": torch.arange(2)}, 0)
        optimizer.zero_grad()
        loss.backward()
        module.on_before_optimizer_step(optimizer)
        optimizer.step()
        return loss

    before = [p.detach().clone() for p in module.net.parameters()]
    prior.broken = True
    assert torch.isfinite(step())
    assert module.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, module.net.parameters()))
    prior.broken = False
    step()
    assert module.skipped_steps == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, module.net.parameters()))


def test_a_score_prior_gives_the_prior_term_the_gradient_of_its_log_likelihood():
    from lightning_modules.nn.elbo import prior_term

    # The score of the clean Gaussian prior at sigma is the gradient of the log-likelihood of its noisy version.
    samples = (0.2 * torch.randn(3, 2, 32, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    value, objective = prior_term(GaussianPrior([0.1, -0.2], [0.3, 0.5], noise_sigma=0.1), samples)
    (by_log_prob,) = torch.autograd.grad(objective.sum(), samples)
    value, objective = prior_term(GaussianPrior([0.1, -0.2], [0.3, 0.5]), samples, score_sigma=0.1)
    (by_score,) = torch.autograd.grad(objective.sum(), samples)
    assert torch.isnan(value).all()
    assert torch.allclose(by_score, by_log_prob, rtol=1e-4, atol=1e-7)
