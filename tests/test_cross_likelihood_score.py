"""The cross-likelihood study on a noise-conditional (score) family: the model at sigma_model is log p_sigma
of the one noiseless network (NoiseLevelView), plus the per-sigma denoising-loss matrix."""
import csv
import json
import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from callbacks.cross_likelihood_report import write_report
from datamodules.toy import ToyDataModule
from lightning_modules.cross_likelihood import CrossLikelihoodModule
from lightning_modules.nn.noise_level_view import NoiseLevelView
from lightning_modules.nn.score_prior import ScoreConfig, ScorePrior
from tests.conftest import TINY_SCORE

SIGMA_DATA = [0.5, 1.0, 2.0]


def untrained(**options):
    """Its output conv starts at zero, so D = c_skip x: the exact denoiser of N(0, sigma_data^2) data."""
    prior = ScorePrior(3, ScoreConfig(width=8, n_layers=2, squeeze=2, embed_dim=8, **options))
    prior.set_sigma_data(SIGMA_DATA)
    return prior


def test_noise_level_view_is_the_gaussian_convolved_with_the_noise():
    prior = untrained(ode_tolerance=1e-5, ode_divergence="exact")
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0))
    var = torch.tensor(SIGMA_DATA).view(1, -1, 1) ** 2
    for sigma in (0.0, 0.1, 0.5):
        view = NoiseLevelView(prior, sigma)
        assert view.noise_sigma == sigma
        with torch.inference_mode():  # the cross-likelihood test loop calls it in inference mode
            log_prob = view.log_prob(x)
        level = max(sigma, prior.cfg.sigma_min) ** 2  # below sigma_min the view is the prior's own p_sigma_min
        exact = (-0.5 * (x**2 / (var + level) + torch.log(2 * math.pi * (var + level)))).mean(dim=2)
        assert torch.allclose(log_prob, exact, rtol=1e-4), (sigma, log_prob, exact)
        assert view.last_likelihood_info["sigma_min"] == max(sigma, prior.cfg.sigma_min)
    with pytest.raises(ValueError, match="sigma_max"):
        NoiseLevelView(prior, prior.cfg.sigma_max)


class DenoisingOnly(nn.Module):
    """A score prior's denoiser with a free log_prob, so the loop tests the denoising matrix alone."""

    def __init__(self, prior):
        super().__init__()
        self.prior = prior

    def log_prob(self, x):
        return x.new_zeros(x.shape[:2])

    def denoising_losses(self, x, sigmas, seed=0):
        return self.prior.denoising_losses(x, sigmas, seed=seed)


def denoising_results(batch_size, prior, sigmas, n_test=5):
    sources = ["sine", "square", "saw"]
    dm = ToyDataModule(sources=sources, eval_length=32, eval_batch_size=batch_size, n_test=n_test)
    module = CrossLikelihoodModule([DenoisingOnly(prior)], [0.0], sources, inputs=[], noise_seed=2,
                                   likelihood_method="test method", denoising_sigmas=sigmas)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.test(module, datamodule=dm, verbose=False)
    return module.results, dm


def test_denoising_loss_matrix_is_each_priors_mse_on_each_source_whatever_the_batch_size():
    prior = untrained()
    torch.nn.init.normal_(prior.net.end_out.conv.weight, std=0.3)  # priors that differ per source
    sigmas = [0.05, 0.5]
    results, dm = denoising_results(2, prior, sigmas)
    block = results["denoising_loss"]
    assert block["sigmas"] == sigmas and "not a likelihood" in block["label"] and block["count"] == 5
    assert results["likelihood_method"] == "test method"
    data = torch.stack([dm.dataset("test")[i]["sources"] for i in range(5)])
    expected = torch.zeros(len(sigmas), 3, 3, dtype=torch.float64)
    with torch.no_grad():
        for i, example in enumerate(data):
            for k in range(3):
                for s, sigma in enumerate(sigmas):
                    noise = torch.randn(3, 3, 32, generator=torch.Generator().manual_seed(2 * 1_000_003 + i))[k]
                    x = example[k].expand(3, -1)  # source k as every prior's input
                    denoised = prior.denoise((x + sigma * noise).unsqueeze(0), sigma)[0]
                    expected[s, k] += (denoised - x).pow(2).mean(dim=1).double()
    expected /= 5
    mse = torch.tensor(block["mse"], dtype=torch.float64)
    assert torch.allclose(mse, expected, rtol=1e-5, atol=1e-7), (mse, expected)
    assert not torch.allclose(mse[:, :, 0], mse[:, :, 1])  # the columns are different priors
    again, _ = denoising_results(3, prior, sigmas)
    assert torch.allclose(torch.tensor(again["denoising_loss"]["mse"], dtype=torch.float64), mse, rtol=1e-6)


def test_report_writes_the_denoising_matrices_labelled_and_the_likelihood_method(tmp_path):
    nan = float("nan")
    results = {
        "sources": ["a", "b"], "likelihood_method": "probability-flow ODE (RK45, rtol=atol=0.01)",
        "matrices": [{"sigma_model": 0.0, "sigma_data": 0.0, "loglik": [[1.0, 0.0], [0.0, 2.0]]}],
        "noise_grid": {"sigma_model": [0.0], "sigma_data": [0.0], "loglik": [[[1.0, 2.0]]]},
        "inputs_table": [{"input": "constant 0", "sigma_model": 0.0, "loglik": [3.0, 4.0]}],
        "denoising_loss": {"sigmas": [0.1, 1.0], "label": "denoising MSE (lower = better); not a likelihood",
                           "mse": [[[0.01, 0.03], [0.02, 0.005]], [[0.2, 0.1], [0.3, nan]]]},
    }
    paths = write_report(results, tmp_path)
    assert paths["denoising_loss"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(paths["csv"], newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["kind"] == "denoising_mse"]
    assert len(rows) == 8 and rows[1] == {"kind": "denoising_mse", "source": "a", "prior": "b", "sigma_model": "0.1",
                                          "sigma_data": "0.1", "loglik": "0.03"}
    data = json.loads(paths["json"].read_text())
    assert data["denoising_loss"]["mse"][1][1][1] == "nan"
    assert [m["discriminates"] for m in data["denoising_loss_margins"]] == [True, False]
    md = paths["summary"].read_text()
    assert md.count("log-likelihood by: probability-flow ODE (RK45, rtol=atol=0.01)") == 3  # matrix, grid, Table 1
    assert "## Denoising loss (not a likelihood)" in md and "### sigma=0.1" in md
    assert "| a | **0.01** | 0.03 |" in md and "lowest on the diagonal: yes" in md


@pytest.mark.slow  # about 2.5 min on 2 CPU cores: many ODE solves
def test_make_cross_likelihood_runs_on_a_tiny_score_run(tmp_path):
    from experiments.cli import main
    from experiments.config import load_config
    from experiments.cross_likelihood import DENOISING_SIGMAS, resolve_sigmas

    common = ["experiment=toy_score", *TINY_SCORE, f"output_root={tmp_path}"]
    assert main(["train", *common, "trainer.max_steps=4", "trainer.val_check_interval=4"]) == 0
    config = load_config("toy_score", "default", TINY_SCORE + [f"output_root={tmp_path}"])
    # Any level is served by the noiseless run: an explicit list needs no fine-tuned copies.
    config.cross_likelihood.sigmas_model = [0.2]
    assert resolve_sigmas(config) == ([0.2], [0.0, 0.2])
    # The ODE settings are inference options, taken from the command line (the exact divergence is tested above;
    # one Hutchinson probe keeps this run cheap).
    assert main(["cross-likelihood", *common, "cross_likelihood.n_test=2", "data.eval_length=64",
                 "model.ode_tolerance=0.01", "model.ode_divergence=hutchinson",
                 "cross_likelihood.n_input_examples=1", "cross_likelihood.sigmas_data=[0.0,0.359]"]) == 0
    out = tmp_path / "toy_score" / "default" / "cross_likelihood"
    results = json.loads((out / "cross_likelihood.json").read_text())
    levels = [0.0, 0.01, 0.027, 0.077, 0.129, 0.359]
    assert [m["sigma_model"] for m in results["matrices"]] == levels and results["count"] == 2
    assert results["noise_grid"]["sigma_model"] == levels and results["noise_grid"]["sigma_data"] == [0.0, 0.359]
    assert {(r["input"], r["sigma_model"]) for r in results["inputs_table"]} == {
        (kind, s) for kind in ("constant 0", "constant 1", "gaussian std 0.5") for s in (0.0, 0.359)}
    values = [v for m in results["matrices"] for row in m["loglik"] for v in row]
    values += [v for row in results["inputs_table"] for v in row["loglik"]]
    report = json.loads((out / "discrimination.json").read_text())
    assert [level["sigma_model"] for level in report["levels"]] == levels
    assert all(level["complexity"] is not None and level["ratio"] is None for level in report["levels"])
    # One noise-conditional pooled network serves the ratio score at every level (its ODE likelihood is the
    # family's, tested above; the flow, WaveNet and LQ-VAE pipelines run the ratio end to end).
    from experiments.cross_likelihood import load_pooled
    from lightning_modules.nn.noise_level_view import NoiseLevelView

    assert main(["train-pooled", *common, "trainer.max_steps=4", "trainer.val_check_interval=4"]) == 0
    pooled = load_pooled(config, [0.0, 0.2])
    assert all(isinstance(view, NoiseLevelView) and view.prior.n_sources == 1 for view in pooled)
    assert [view.noise_sigma for view in pooled] == [0.0, 0.2] and pooled[0].prior is pooled[1].prior
    assert all(isinstance(v, float) and math.isfinite(v) for v in values)
    # Noisier data under the matching (wider) model scores lower per sample, as a density must on average.
    grid = torch.tensor(results["noise_grid"]["loglik"])  # [sigma_model, sigma_data, source]
    assert (grid[0, 0] > grid[-1, 1]).all(), grid
    block = results["denoising_loss"]
    assert block["sigmas"] == list(DENOISING_SIGMAS) and len(block["mse"]) == 6 and len(block["mse"][0]) == 4
    assert all(v >= 0 for per_sigma in block["mse"] for row in per_sigma for v in row)
    method = results["likelihood_method"]
    assert "probability-flow ODE" in method and "rtol=atol=0.01" in method and "divergence hutchinson" in method
    md = (out / "summary.md").read_text()
    assert md.count("log-likelihood by: probability-flow ODE") == 6 + 2  # every matrix, the grid, Table 1
    assert "## Denoising loss (not a likelihood)" in md
    for name in ("cross_likelihood.csv", "matrices.png", "noise_grid.png", "denoising_loss.png"):
        assert (out / name).is_file(), name
    quality = json.loads((out / "denoiser_quality.json").read_text())
    assert quality["sigmas"] == [0.01, 0.03, 0.1, 0.3, 1.0] and len(quality["noise_left"][2]) == 4
    assert "(linear)" in (out / "denoiser_quality.md").read_text()
