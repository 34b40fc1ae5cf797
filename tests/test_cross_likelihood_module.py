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
