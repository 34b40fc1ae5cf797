"""Wake-sleep's sleep phase for the amortised posterior: prior draws, the bank's mixtures, and what q learns."""
import csv
import json
from types import SimpleNamespace
from unittest.mock import PropertyMock, patch

import pytest
import torch

from experiments.cli import main
from experiments.config import load_config
from experiments.train import train_noiseless
from experiments.train_posterior import sleep_bank
from lightning_modules.nn.gaussian_prior import GaussianPrior
from lightning_modules.nn.sleep_bank import SleepBank
from lightning_modules.posterior_module import PosteriorModule
from lightning_modules.samplers.prior_sampling import sample_score_prior
from tests.conftest import TINY_POSTERIOR, TINY_SCORE, logged


def test_prior_draws_have_the_priors_moments_and_depend_on_the_generator_alone():
    prior = GaussianPrior([0.3, -0.2], [0.5, 0.1])

    def draw(seed, batch):
        return sample_score_prior(prior, 512, 2, 64, torch.Generator().manual_seed(seed), steps=40, sigma_max=10.0,
                                  sigma_min=1e-3, batch_size=batch)
    draws = draw(0, 512)
    assert draws.shape == (512, 2, 64)
    assert torch.allclose(draws.mean(dim=(0, 2)), torch.tensor([0.3, -0.2]), atol=0.01)
    assert torch.allclose(draws.std(dim=(0, 2)), torch.tensor([0.5, 0.1]), rtol=0.05)
    assert torch.equal(draws, draw(0, 512)) and not torch.equal(draws, draw(1, 512))


def test_a_bank_mixes_independent_windows_of_each_sources_draws():
    # Every value names its draw, source and time: draw * 1000 + source * 100 + t.
    draws = (torch.arange(6).view(6, 1, 1) * 1000 + torch.arange(3).view(1, 3, 1) * 100
             + torch.arange(40).view(1, 1, 40)).float()
    alpha = torch.tensor([0.2, 0.3, 0.5])
    sources, mix = SleepBank(draws).batch(64, 16, alpha, torch.Generator().manual_seed(0))
    assert sources.shape == (64, 3, 16) and torch.allclose(mix, (alpha.view(1, 3, 1) * sources).sum(dim=1))
    row, source, start = sources[..., 0] // 1000, (sources[..., 0] % 1000) // 100, sources[..., 0] % 100
    assert torch.equal(source, torch.arange(3).expand(64, 3))
    assert torch.equal(sources - sources[..., :1], torch.arange(16).float().expand(64, 3, 16))  # one window
    assert (start <= 40 - 16).all() and len(start.unique()) > 10
    assert (row[:, 0] != row[:, 1]).any() and len(row.unique()) == 6  # rows drawn per source
    with pytest.raises(ValueError, match="longer draws"):
        SleepBank(draws).batch(2, 41, alpha, torch.Generator())


def test_the_sleep_phase_learns_the_exact_posterior_marginals_not_the_mean_field_ones():
    """Forward KL from the model's own pairs: q's mean is the posterior mean and its scale the posterior's
    marginal std, unlike the ELBO's mean-field scale 1 / sqrt(precision_kk) (test_variational.py)."""
    prior = GaussianPrior([0.2, -0.3], [0.25, 0.4])
    alpha, gamma = [0.5, 0.5], 0.1
    torch.manual_seed(0)
    draws = prior.means.view(1, 2, 1) + prior.variances.sqrt().view(1, 2, 1) * torch.randn(4096, 2, 96)
    module = PosteriorModule(net={"width": 16, "n_layers": 3, "distribution": "normal", "init_scale": 0.2},
                             sources=["a", "b"], alpha=alpha, gamma=gamma, prior=prior, sleep_steps=400, bank=draws)
    optimizer = torch.optim.Adam(module.net.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(400):
        loss = module.sleep_loss(8, 64, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _, mix = module.bank.batch(8, 96, module.alpha, generator, gamma)
    with torch.no_grad():
        q = module.posterior(mix)
    mean, covariance = prior.posterior(mix, alpha, gamma)
    inner = slice(8, -8)  # the zero-padded edges see less context
    error = (q.mean - mean.float())[..., inner]
    posterior_std = covariance.diagonal().sqrt().float()
    assert (error.abs() / posterior_std.view(1, 2, 1)).mean() < 0.15
    assert torch.allclose(q.scale[..., inner].mean(dim=(0, 2)), posterior_std, rtol=0.08)
    mean_field_std = torch.linalg.inv(covariance).diagonal().rsqrt().float()
    assert (posterior_std - mean_field_std).abs().min() > 0.25 * posterior_std.min()  # the two answers differ


def test_sleep_steps_come_first_then_the_elbo():
    prior = GaussianPrior([0.0, 0.0], [0.3, 0.3])
    module = PosteriorModule(net={"width": 8, "n_layers": 2, "distribution": "normal"}, sources=["a", "b"],
                             alpha=[0.5, 0.5], prior=prior, sleep_steps=3)
    batch = {"mix": torch.zeros(2, 32), "index": torch.arange(2)}
    with pytest.raises(ValueError, match="sleep bank"):
        module.training_step(batch, 0)
    module.bank = SleepBank(torch.randn(4, 2, 32))
    logged = []
    module.log = lambda name, *args, **kwargs: logged.append(name)
    module.training_step(batch, 0)
    assert "train/sleep_nll" in logged and "train/mixture" not in logged
    logged.clear()
    with patch.object(PosteriorModule, "global_step", new_callable=PropertyMock, return_value=3):
        module.training_step(batch, 0)
    assert "train/mixture" in logged and "train/sleep_nll" not in logged
    with pytest.raises(ValueError, match="sleep_steps must be >= 0"):
        PosteriorModule(net={}, sources=["a", "b"], alpha=[0.5, 0.5], prior=prior, sleep_steps=-1)


def test_make_train_posterior_sleeps_on_a_cached_bank_then_wakes(tmp_path):
    root = tmp_path / "runs"
    common = TINY_SCORE + [f"output_root={root}"]
    train_noiseless(load_config("toy_score", "default", common))
    sleep = [*TINY_POSTERIOR, "posterior.prior_sigma=0.1", "posterior.sleep_steps=20", "posterior.sleep_draws=6",
             "posterior.sleep_sampler_steps=4", "posterior.sources=[sine,square]"]
    assert main(["train-posterior", "experiment=toy_score", *common, *sleep]) == 0
    posterior = root / "toy_score" / "default" / "posterior" / "sine-square"
    with open(posterior / "logs" / "metrics.csv") as stream:
        rows = [row for row in csv.DictReader(stream) if row.get("step")]

    def steps(key):
        return {int(row["step"]) for row in rows if row.get(key)}
    assert {4, 9, 14, 19} <= steps("train/sleep_nll") and min(steps("train/mixture")) >= 20  # sleep, then the ELBO
    nll = logged(posterior, "train/sleep_nll")
    assert nll[-1] < nll[0]
    banks = sorted((root / "toy_score" / "default" / "sleep_banks").iterdir())
    assert [bank.suffix for bank in banks] == [".json", ".pt"]
    draws = torch.load(banks[1], weights_only=True)
    # Every source of the run is drawn, so a posterior of other sources can reuse the bank.
    assert draws.shape == (6, 4, 512) and torch.isfinite(draws).all()
    key = json.loads(banks[0].read_text())
    assert key["sources"] == ["sine", "square", "saw", "triangle"] and len(key["prior_sha256"]) == 64
    # Another posterior of the same priors, of other sources, reuses the bank; a finished one draws none.
    before = banks[1].stat().st_mtime_ns
    again = [*sleep[:-1], "posterior.sources=[saw,square]", "posterior.name=again"]
    with patch("experiments.train_posterior.sample_score_prior", side_effect=AssertionError("drew again")):
        assert main(["train-posterior", "experiment=toy_score", *common, *again]) == 0
        assert main(["train-posterior", "experiment=toy_score", *common, *again]) == 0
        config = load_config("toy_score", "default", [*common, *again])
        record = {"sha256": key["prior_sha256"]}
        served = sleep_bank(config, SimpleNamespace(denoise=None), ["saw", "square"], record)
        assert torch.equal(served, draws[:, [2, 1]])
    assert banks[1].stat().st_mtime_ns == before
