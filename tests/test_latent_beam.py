"""The beam over partial code tuples (lightning_modules/samplers/latent_beam.py), the latent posterior's
search for N > 2 sources: exhaustive at width K^(N-1), mixture-aware where top-k is blind, the pair path
untouched, bad settings refused."""
import itertools
from types import SimpleNamespace

import pytest
import torch

from experiments.config import load_config
from lightning_modules.nn.latent_prior import LatentPrior, LatentPriorConfig
from lightning_modules.samplers.latent_beam import beam_search, remaining_moments
from lightning_modules.samplers.latent_posterior import LatentSeparator
from lightning_modules.samplers.registry import build_latent


@pytest.fixture(scope="module")
def prior():
    """K = 4 codes of 3 dims, 4 sources: 4^3 = 64 joint codes for three of them."""
    torch.manual_seed(0)
    cfg = LatentPriorConfig(codebook_size=4, code_dim=3, vq_width=8, strides=[4], res_depth=1, width=16,
                            n_layers=1, n_heads=2, context=8)
    model = LatentPrior(4, cfg)
    model.lqvae.quantizer.ema_update(torch.randn(64, 3))
    return model.eval()


def separator(prior, n=3, **options):
    return LatentSeparator(prior, list(range(n)), torch.full((n,), 1.0 / n), length=32, **options)


def exhaustive(codebook, log_priors, mix_code, alpha, sigma):
    """Every tuple by loops, in float64: {tuple: log-prior sum - ||m - sum_k alpha_k e_zk||^2 / (2 sigma^2)}."""
    n, k = log_priors.shape
    codebook, log_priors, mix_code = codebook.double(), log_priors.double(), mix_code.double()
    scores = {}
    for codes in itertools.product(range(k), repeat=n):
        summed = sum(float(alpha[i]) * codebook[c] for i, c in enumerate(codes))
        scores[codes] = float(sum(log_priors[i, c] for i, c in enumerate(codes))
                              - (mix_code - summed).pow(2).sum() / (2 * sigma**2))
    return scores


def test_a_beam_of_width_k_to_the_n_minus_1_equals_exhaustive_search(prior):
    k, n, sigma = 4, 3, 0.3
    width = k ** (n - 1)
    sep = separator(prior, n, sigma=sigma, beam=width)
    torch.manual_seed(1)
    log_priors, mix_code = torch.randn(3, n, k).log_softmax(-1), 0.5 * torch.randn(3, 3)
    tuples, scores = sep.step_scores(log_priors, mix_code)
    assert tuples.shape == (3, width, n) and scores.shape == (3, width)
    codebook = prior.lqvae.quantizer.codebook
    for m in range(3):
        every = exhaustive(codebook, log_priors[m], mix_code[m], sep.alpha, sigma)
        best = sorted(every, key=every.get, reverse=True)[:width]
        got = [tuple(t.tolist()) for t in tuples[m]]
        assert got[0] == best[0]  # the same best tuple
        assert set(got) == set(best)  # the same top K^(N-1) of the K^N tuples
        for codes, score in zip(got, scores[m].tolist()):  # with the same scores
            assert score == pytest.approx(every[codes], abs=1e-4)


def test_a_beam_wider_than_the_joint_scores_every_tuple_once(prior):
    sep = separator(prior, 3, sigma=0.5, beam=1000)
    torch.manual_seed(2)
    log_priors, mix_code = torch.randn(2, 3, 4).log_softmax(-1), torch.randn(2, 3)
    tuples, scores = sep.step_scores(log_priors, mix_code)
    assert tuples.shape == (2, 64, 3)  # min(width, K^N): the exact posterior over the 64 tuples
    every = exhaustive(prior.lqvae.quantizer.codebook, log_priors[0], mix_code[0], sep.alpha, 0.5)
    got = {tuple(t.tolist()): s for t, s in zip(tuples[0], scores[0].tolist())}
    assert set(got) == set(every)
    assert all(got[codes] == pytest.approx(every[codes], abs=1e-4) for codes in every)


def test_the_beam_finds_codes_outside_every_priors_top_k():
    """Each source's true code is third under its prior: the top-2 approximation (8 tuples) cannot propose
    the true tuple, a beam of 2 sees the mixture and ranks it first."""
    torch.manual_seed(0)
    k, n = 8, 3
    codebook, alpha = 2 * torch.randn(k, 3), torch.full((n,), 1.0 / n)
    truth = [5, 1, 6]
    logits = torch.full((n, k), -3.0)
    for i, code in enumerate(truth):
        logits[i, [c for c in range(k) if c != code][:2]] = 0.0
        logits[i, code] = -1.0
    log_priors = logits.log_softmax(-1)[None]
    mix_code = (alpha[:, None] * codebook[truth]).sum(0, keepdim=True)
    top2 = log_priors.topk(2, dim=-1).indices[0]
    assert not any(truth[i] in top2[i] for i in range(n))
    assert beam_search(log_priors, mix_code, codebook, alpha, 0.1, width=2)[0, 0].tolist() == truth


def test_the_completion_is_the_moments_of_the_unassigned_sources_weighted_codes():
    torch.manual_seed(7)
    log_priors, codebook, alpha = torch.randn(1, 3, 4).log_softmax(-1), torch.randn(4, 2), torch.tensor([0.5, 1, 2])
    mean, variance = remaining_moments(log_priors, codebook, alpha)
    probs = log_priors[0].exp()
    for j in range(3):  # after source j: the independent sources j+1.. summed, by their priors' moments
        expect_mean = sum(alpha[i] * (probs[i, :, None] * codebook).sum(0) for i in range(j + 1, 3))
        expect_variance = sum(alpha[i] ** 2 * ((probs[i, :, None] * codebook**2).sum(0)
                                               - (probs[i, :, None] * codebook).sum(0) ** 2) for i in range(j + 1, 3))
        assert torch.allclose(mean[0, j], torch.as_tensor(expect_mean).expand(2).float(), atol=1e-6)
        assert torch.allclose(variance[0, j], torch.as_tensor(expect_variance).expand(2).float(), atol=1e-6)


def test_two_sources_keep_the_exact_pairs_whatever_the_search(prior):
    torch.manual_seed(3)
    log_priors, mix_code = torch.randn(2, 2, 4).log_softmax(-1), torch.randn(2, 3)
    beam = separator(prior, 2, beam=1).step_scores(log_priors, mix_code)
    topk = separator(prior, 2, search="topk").step_scores(log_priors, mix_code)
    assert beam[0].shape == (2, 16, 2)  # all K^2 pairs, not a beam of one
    assert torch.equal(beam[0], topk[0]) and torch.equal(beam[1], topk[1])


def test_the_top_k_search_stays_reachable(prior):
    torch.manual_seed(4)
    log_priors, mix_code = torch.randn(2, 3, 4).log_softmax(-1), torch.randn(2, 3)
    sep = separator(prior, 3, search="topk", top_k=2)
    tuples, scores = sep.step_scores(log_priors, mix_code)
    assert tuples.shape == (2, 8, 3)
    top = log_priors.topk(2, dim=-1).indices
    assert all(tuples[m, :, i].unique().tolist() == sorted(top[m, i].tolist()) for m in range(2) for i in range(3))
    every = exhaustive(prior.lqvae.quantizer.codebook, log_priors[0], mix_code[0], sep.alpha, sep.sigma)
    for codes, score in zip(tuples[0].tolist(), scores[0].tolist()):
        assert score == pytest.approx(every[tuple(codes)], abs=1e-4)


def test_bad_search_settings_are_refused_with_a_clear_message(prior):
    with pytest.raises(ValueError, match="latent_beam must be >= 1"):
        separator(prior, 3, beam=0)
    with pytest.raises(ValueError, match="latent_search"):
        separator(prior, 3, search="greedy")
    with pytest.raises(ValueError, match="latent_top_k"):
        separator(prior, 3, search="topk")
    with pytest.raises(ValueError, match="latent_beam must be >= 1"):
        beam_search(torch.zeros(1, 3, 4), torch.zeros(1, 3), torch.zeros(4, 3), torch.ones(3), 0.4, 0)


def test_the_configuration_builds_the_beam_by_default(prior):
    settings = load_config("toy_lqvae").separation
    assert settings.latent_search == "beam" and settings.latent_beam == 64
    sep = build_latent(prior, torch.full((4,), 0.25), settings, [0, 1, 2, 3], 32)
    assert (sep.search, sep.beam) == ("beam", 64)
    changed = SimpleNamespace(**{**{key: settings[key] for key in settings}, "latent_search": "topk"})
    topk = build_latent(prior, torch.full((4,), 0.25), changed, [0, 1, 2, 3], 32)
    assert topk.search == "topk" and topk.top_k == 8


def test_four_sources_separate_with_the_beam_reproducibly(prior):
    sep = LatentSeparator(prior, [0, 1, 2, 3], torch.full((4,), 0.25), length=32, beam=8)
    torch.manual_seed(5)
    mixes = torch.randn(2, 32)
    estimates, trace = sep(mixes, 3, seeds=[7, 8])
    assert estimates.shape == (2, 3, 4, 32) and torch.isfinite(estimates).all()
    assert sep.last_selection.shape == (6, 4) and torch.isfinite(trace["loglik"]).all()
    alone, _ = sep(mixes[1:], 3, seeds=[8])
    assert torch.equal(estimates[1], alone[0])


def test_the_beam_under_bf16_autocast_is_the_float32_one():
    torch.manual_seed(6)
    codebook = 100 + 0.01 * torch.randn(6, 3)  # codes 0.01 apart around 100, where bf16 steps by 0.5
    log_priors, alpha = torch.randn(2, 3, 6).log_softmax(-1), torch.full((3,), 1.0 / 3)
    mix_code = 100 + 0.01 * torch.randn(2, 3)
    expected = beam_search(log_priors, mix_code, codebook, alpha, 0.01, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(beam_search(log_priors, mix_code, codebook, alpha, 0.01, 5), expected)


@pytest.mark.parametrize("target", ["quantised", "latent"])
def test_the_mixture_target_is_the_quantised_code_or_the_encoders_own_output(prior, target):
    sep = separator(prior, beam=4, target=target)
    seen, step_scores = [], sep.step_scores

    def recording(log_priors, mix_code):
        seen.append(mix_code.clone())
        return step_scores(log_priors, mix_code)
    sep.step_scores = recording
    torch.manual_seed(9)
    mixes = torch.randn(2, 32)
    sep(mixes, 1, seeds=[0, 1])
    with torch.no_grad():
        latent = prior.lqvae.encode(mixes)
        expected = latent if target == "latent" else prior.lqvae.quantizer.quantise(latent)
    assert torch.allclose(torch.stack(seen, 1), expected.transpose(1, 2))
    with pytest.raises(ValueError, match="unknown separation.latent_target 'codes'"):
        separator(prior, target="codes")
