import math

import pytorch_lightning as pl
import torch
from torch import nn

from datamodules.toy import ToyDataModule
from lightning_modules.cross_likelihood import CrossLikelihoodModule, example_noise, synthetic_input


class GaussianPriors(nn.Module):
    """Analytic prior family: source j ~ i.i.d. N(0, scale_j^2) per sample."""

    def __init__(self, scales):
        super().__init__()
        self.register_buffer("scales", torch.tensor(scales))

    def log_prob(self, x):
        scale = self.scales.view(1, -1, 1)
        return (-0.5 * (x / scale) ** 2 - torch.log(scale) - 0.5 * math.log(2 * math.pi)).mean(dim=2)


def test_cross_likelihood_matches_direct_computation():
    sources = ["sine", "square", "saw"]
    scales = [[0.5, 0.7, 1.0], [0.3, 0.9, 2.0]]
    sigmas = [0.0, 0.1]
    dm = ToyDataModule(sources=sources, eval_length=64, eval_batch_size=3, n_test=7)
    module = CrossLikelihoodModule([GaussianPriors(s) for s in scales], sigmas, sources,
                                   sigmas_data=[0.0, 0.2], n_input_examples=2, input_length=64, noise_seed=3)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.test(module, datamodule=dm, verbose=False)
    results = module.results

    data = torch.stack([dm.dataset("test")[i]["sources"] for i in range(7)])
    noise = example_noise(range(7), data.shape[1:], seed=3)
    for a, (scale, sigma) in enumerate(zip(scales, sigmas)):
        prior = GaussianPriors(scale)
        for k in range(3):
            x = (data + sigma * noise)[:, k : k + 1].expand(-1, 3, -1)
            expected = prior.log_prob(x).mean(dim=0)
            assert torch.allclose(torch.tensor(results["matrices"][a]["loglik"][k], dtype=torch.float64), expected.double(), atol=1e-5)
        for b, sigma_data in enumerate([0.0, 0.2]):
            expected = prior.log_prob(data + sigma_data * noise).mean(dim=0)
            assert torch.allclose(torch.tensor(results["noise_grid"]["loglik"][a][b], dtype=torch.float64), expected.double(), atol=1e-5)
    assert results["count"] == 7
    table = {(row["input"], row["sigma_model"]): row["loglik"] for row in results["inputs_table"]}
    zeros = GaussianPriors(scales[1]).log_prob(synthetic_input("constant 0", 2, 3, 64)).mean(dim=0)
    assert torch.allclose(torch.tensor(table[("constant 0", 0.1)], dtype=torch.float64), zeros.double(), atol=1e-6)
    assert len(table) == 6  # 3 inputs x (noiseless, widest)
    assert results["inputs_table_sigmas"] == {"noiseless": 0.0, "wide": 0.1, "requested": None}


def test_table_1_uses_the_papers_level_when_it_was_trained():
    sigmas = [0.0, 0.359, 1.0]  # the BASIS grid adds 1.0; paper 003's Table 1 is at 0.359
    priors = [GaussianPriors([0.5 + a, 1.0]) for a in range(3)]
    module = CrossLikelihoodModule(priors, sigmas, ["sine", "saw"], n_input_examples=1, input_length=16,
                                   table_sigma=0.359)
    assert {row["sigma_model"] for row in module.inputs_table()} == {0.0, 0.359}
    assert module.inputs_table_sigmas() == {"noiseless": 0.0, "wide": 0.359, "requested": 0.359}
    # Without that level, the largest one stands in, and the results say so.
    module = CrossLikelihoodModule(priors[:1] + priors[2:], [0.0, 1.0], ["sine", "saw"], n_input_examples=1,
                                   input_length=16, table_sigma=0.359)
    assert {row["sigma_model"] for row in module.inputs_table()} == {0.0, 1.0}
    assert module.inputs_table_sigmas()["wide"] == 1.0


def test_noise_depends_on_example_not_batch():
    assert torch.equal(example_noise([5], (2, 8), 0)[0], example_noise([1, 5], (2, 8), 0)[1])


def discrimination_of(prior, sources):
    from callbacks.discrimination import discrimination

    dm = ToyDataModule(sources=sources, eval_length=64, eval_batch_size=2, n_test=4)
    module = CrossLikelihoodModule([prior], [0.0], sources, n_input_examples=1, input_length=64, sample_rate=16000)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.test(module, datamodule=dm, verbose=False)
    return module.results, discrimination(module.results)


def test_complexity_score_is_na_for_discrete_families_and_unchanged_for_densities():
    from callbacks.discrimination import crop_scores
    from callbacks.discrimination_report import summary_md
    from lightning_modules.metrics.coder_length import coder_length, log_step
    from lightning_modules.nn.latent_prior import LatentPrior, LatentPriorConfig
    from tests.test_wavenet import tiny_wavenet

    sources = ["sine", "square", "saw"]
    # A density: log p + log(step) + L(x), as before.
    results, report = discrimination_of(GaussianPriors([0.5, 0.7, 1.0]), sources)
    per_crop = results["per_crop"]
    data = torch.stack([ToyDataModule(sources=sources, eval_length=64).dataset("test")[i]["sources"]
                        for i in range(4)])
    assert torch.allclose(torch.tensor(per_crop["coder_length"][0], dtype=torch.float64), coder_length(data, 16000))
    complexity = crop_scores(per_crop, 0, "complexity")
    expected = (torch.tensor(per_crop["loglik"][0], dtype=torch.float64) + log_step(16)
                + torch.tensor(per_crop["coder_length"][0], dtype=torch.float64)[:, :, None])
    assert torch.allclose(torch.from_numpy(complexity), expected)
    assert report["levels"][0]["complexity"] is not None
    # Probabilities of mu-law classes or LQ-VAE codes: log(step) + L(x) has other units, no score.
    torch.manual_seed(0)
    latent = LatentPrior(3, LatentPriorConfig(codebook_size=8, code_dim=3, vq_width=8, strides=[4], res_depth=1,
                                              width=16, n_layers=1, n_heads=2, context=8))
    latent.lqvae.quantizer.ema_update(torch.randn(64, 3))
    for discrete in (tiny_wavenet("mulaw", n_priors=3), latent.eval()):
        results, report = discrimination_of(discrete, sources)
        assert report["levels"][0]["complexity"] is None
        assert report["levels"][0]["raw"] is not None
        assert all(row["score"] != "complexity" for row in report["inputs"])
        assert "not a waveform density" in summary_md(report)
