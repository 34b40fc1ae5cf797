"""The score prior family: EDM denoisers trained by denoising score matching, one per source."""
import json
import math

import pytest
import torch

from experiments.cli import main
from experiments.config import load_config
from experiments.run_layout import load_prior, prior_dir
from lightning_modules.nn.score_prior import ScoreConfig, ScorePrior
from lightning_modules.prior_module import PriorModule
from tests.conftest import TINY_POSTERIOR, TINY_SCORE

SIGMA_DATA = [0.5, 1.0, 2.0]


def untrained(**options):
    """Its output conv starts at zero, so D = c_skip x: the exact denoiser of N(0, sigma_data^2) data."""
    prior = ScorePrior(3, ScoreConfig(width=8, n_layers=2, squeeze=2, embed_dim=8, **options))
    prior.set_sigma_data(SIGMA_DATA)
    return prior


def test_the_analytic_gaussian_denoiser_has_the_closed_form_score_and_ode_likelihood():
    prior = untrained(ode_tolerance=1e-5, ode_divergence="exact")
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0))
    var = torch.tensor(SIGMA_DATA).view(1, -1, 1) ** 2
    for sigma in (0.01, 0.3, 3.0):
        assert torch.allclose(prior.score(x, sigma), -x / (var + sigma**2), rtol=1e-5, atol=1e-6)
        assert torch.allclose(prior.denoise(x, sigma), var / (var + sigma**2) * x, rtol=1e-5, atol=1e-6)
    with torch.inference_mode():  # the cross-likelihood test loop calls it in inference mode
        log_prob = prior.log_prob(x)
    exact = (-0.5 * (x**2 / (var + 1e-6) + torch.log(2 * math.pi * (var + 1e-6)))).mean(dim=2)
    assert torch.allclose(log_prob, exact, rtol=1e-4), (log_prob, exact)
    assert prior.last_likelihood_info["divergence"] == "exact"
    assert "probability-flow ODE" in prior.likelihood_method


def test_each_source_has_its_own_denoiser():
    prior = untrained()
    torch.nn.init.normal_(prior.net.end_out.conv.weight, std=0.1)  # a non-trivial network
    x = torch.randn(2, 3, 32, requires_grad=True)
    out = prior.denoise(x, 0.2)
    (grad,) = torch.autograd.grad(out[:, 0].sum(), x)
    assert grad[:, 0].abs().sum() > 0 and grad[:, 1:].abs().sum() == 0
    # Every parameter is grouped by prior, so per-prior clipping and NaN skips apply unchanged.
    PriorModule({"name": "score", "width": 8, "n_layers": 2, "squeeze": 2, "embed_dim": 8}, ["a", "b", "c"])


def test_denoising_score_matching_loss_decreases_on_a_short_real_training():
    from datamodules.toy_waveforms import toy_example

    torch.manual_seed(0)
    module = PriorModule({"name": "score", "width": 16, "n_layers": 4, "squeeze": 4, "embed_dim": 16},
                         ["sine", "square"])
    data = torch.stack([toy_example(i, ["sine", "square"], 256, 16000) for i in range(64)])
    module.prior.set_sigma_data(data.pow(2).mean(dim=(0, 2)).sqrt())
    held_out = torch.stack([toy_example(10_000 + i, ["sine", "square"], 256, 16000) for i in range(16)])

    def held_out_loss():
        with torch.no_grad():
            return module.objective(held_out, torch.Generator().manual_seed(1)).mean(dim=0)

    before = held_out_loss()
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    for step in range(60):
        batch = data[torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(step))]
        loss = module.objective(batch, torch.Generator().manual_seed(100 + step)).mean(dim=0).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out_loss()
    assert (after < 0.95 * before).all(), (before, after)  # both priors learn their class


def test_train_writes_a_resumable_run_with_sigma_data_and_refuses_noise_fine_tuning(tmp_path, capsys):
    overrides = TINY_SCORE + [f"output_root={tmp_path}", "trainer.max_steps=6", "trainer.val_check_interval=3"]
    assert main(["train", "experiment=toy_score", *overrides]) == 0
    config = load_config("toy_score", "default", overrides)
    run = prior_dir(config, 0.0)
    done = json.loads((run / "done.json").read_text())
    assert done["global_step"] == 6 and "val/dsm_loss" in done["metrics"]
    prior = load_prior(run).prior
    assert bool(prior.sigma_data_measured)
    # sigma_data is the RMS of each toy class (amplitude U[0.8, 1]): sine ~0.64, square ~0.9.
    sine, square = prior.sigma_data[:2].tolist()
    assert 0.55 < sine < 0.72 and 0.8 < square < 1.0, prior.sigma_data
    # Noise-conditional: fine-tuning one level is an error, the whole grid is nothing to do.
    assert main(["finetune", "experiment=toy_score", "sigma=0.1", *overrides]) == 2
    assert "noise-conditional" in capsys.readouterr().err
    assert main(["finetune-all", "experiment=toy_score", *overrides]) == 0
    assert not any(p.name.startswith("sigma_") for p in run.parent.iterdir())
    # A variational posterior trains against the score at posterior.prior_sigma (the gradient of log p_sigma).
    args = [*overrides, *TINY_POSTERIOR, "posterior.max_steps=4", "posterior.val_check_interval=2"]
    assert main(["train-posterior", "experiment=toy_score", *args]) == 2
    assert "posterior.prior_sigma > 0" in capsys.readouterr().err
    assert main(["train-posterior", "experiment=toy_score", *args, "posterior.prior_sigma=0.05"]) == 0
    done = json.loads((run.parent / "posterior" / "sine-square-saw-triangle" / "done.json").read_text())
    assert done["prior"]["score_sigma"] == 0.05 and done["global_step"] == 4
    assert "val/si_sdri_mean" in done["metrics"] and "val/elbo" not in done["metrics"]


def test_unknown_sigma_sampling_is_a_clear_error():
    with pytest.raises(ValueError, match="sigma_sampling"):
        ScorePrior(2, ScoreConfig(sigma_sampling="uniform"))
