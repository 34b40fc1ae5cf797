"""separation.latent_sigma=auto: the true pair's teacher-forced step posterior against a brute-force loop, the
choice of the best sigma, and what is refused."""
import math

import pytest
import torch

from lightning_modules.nn.latent_prior import LatentPrior, LatentPriorConfig
from lightning_modules.samplers.latent_posterior import LatentSeparator
from lightning_modules.samplers.latent_sigma import best_sigma, truth_log_posterior


@pytest.fixture(scope="module")
def prior():
    torch.manual_seed(0)
    cfg = LatentPriorConfig(codebook_size=16, code_dim=3, vq_width=8, strides=[4], res_depth=1, width=16,
                            n_layers=1, n_heads=2, context=4)
    model = LatentPrior(3, cfg)
    with torch.no_grad():  # a codebook spread over the encoder's own latents, so mixtures differ in code
        latents = model.lqvae.encode(0.5 * torch.randn(32, 64)).transpose(1, 2).reshape(-1, 3)
    model.lqvae.quantizer.ema_update(latents)
    for parameter in model.transformer.parameters():  # priors that are not uniform, so the past matters
        parameter.data.normal_(0, 0.5)
    return model.eval()


def brute_force(prior, indices, alpha, sources, sigma, target="quantised"):
    """Loops over crops, steps and all K^2 pairs; the Transformers see the true past of each window."""
    lqvae, transformer = prior.lqvae, prior.transformer
    codebook, k = lqvae.quantizer.codebook, lqvae.quantizer.codebook.shape[0]
    total, count = 0.0, 0
    with torch.no_grad():
        for crop in sources:
            codes = [lqvae.codes(crop[n:n + 1])[0] for n in range(2)]
            mix = (alpha[0] * crop[0] + alpha[1] * crop[1])[None]
            mix_latent = lqvae.encode(mix)
            if target == "quantised":
                mix_latent = lqvae.quantizer.quantise(mix_latent)
            mix_latent = mix_latent[0].T  # [S, D]
            context = transformer.cfg.context
            for s in range(len(codes[0])):
                start = s - s % context
                full = torch.zeros(1, 3, s - start + 1, dtype=torch.long)
                for n, row in enumerate(indices):
                    full[0, row] = codes[n][start:s + 1]
                log_p = [transformer(full)[0, row, -1].log_softmax(-1) for row in indices]
                scores = torch.empty(k, k)
                for i in range(k):
                    for j in range(k):
                        summed = alpha[0] * codebook[i] + alpha[1] * codebook[j]
                        if target == "quantised":  # B_Q of the sum; E(m) is compared with the sum itself
                            summed = codebook[(summed - codebook).pow(2).sum(-1).argmin()]
                        distance = (mix_latent[s] - summed).pow(2).sum()
                        scores[i, j] = log_p[0][i] + log_p[1][j] - distance / (2 * sigma**2)
                total += float(scores.flatten().log_softmax(0)[codes[0][s] * k + codes[1][s]])
                count += 1
    return total / count


@pytest.mark.parametrize("target", ["quantised", "latent"])
def test_the_true_pairs_log_posterior_equals_a_brute_force_loop(prior, target):
    torch.manual_seed(1)
    sources = 0.5 * torch.randn(2, 2, 32)  # 8 codes per crop: two windows of the 4-code context
    indices, alpha = [2, 0], torch.tensor([0.6, 0.4])  # unequal: a midpoint would tie between two codes
    separator = LatentSeparator(prior, indices, alpha, length=32, sigma=0.4, target=target)
    table = truth_log_posterior(separator, sources, sigmas=(0.05, 0.3), chunk=5)
    for sigma in (0.05, 0.3):
        expected = brute_force(prior, indices, alpha, sources, sigma, target)
        assert table[sigma] == pytest.approx(expected, abs=1e-4)
    assert separator.sigma == 0.4  # the calibration leaves the separator's own sigma alone


def test_the_best_sigma_is_the_most_probable_and_the_milder_on_a_tie():
    assert best_sigma({0.01: -9.0, 0.05: -3.0, 0.4: -5.0}) == 0.05
    assert best_sigma({0.01: -3.0, 0.05: -3.0, 0.4: -math.inf}) == 0.05
    with pytest.raises(ValueError, match="finite"):
        best_sigma({0.01: -math.inf})


def test_more_than_two_sources_and_bad_values_are_refused(prior):
    three = LatentSeparator(prior, [0, 1, 2], torch.tensor([1 / 3] * 3), length=32, sigma=0.4)
    with pytest.raises(ValueError, match="two sources"):
        truth_log_posterior(three, torch.zeros(1, 3, 32))
    delta = LatentSeparator(prior, [0, 1], torch.tensor([0.5, 0.5]), length=32, sigma=0.4, likelihood="delta")
    with pytest.raises(ValueError, match="Gaussian"):
        truth_log_posterior(delta, torch.zeros(1, 2, 32))
    separator = LatentSeparator(prior, [0, 1], torch.tensor([0.5, 0.5]), length=32, sigma=0.4)
    with pytest.raises(ValueError, match="> 0"):
        separator.set_sigma(0.0)
    separator.set_sigma(0.05)
    assert separator.sigma == 0.05 and set(separator.trace_sigmas) == {0.05}
