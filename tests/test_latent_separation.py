"""Latent-domain separation (paper 002 section 4) on a tiny untrained LQ-VAE prior: the per-step posterior
against brute force, the choice under uniform priors, the pair table's cache, reproducible candidates."""
import itertools

import pytest
import torch

from lightning_modules.samplers.latent_posterior import LatentSeparator, pair_sum_table
from lightning_modules.nn.latent_prior import LatentPrior, LatentPriorConfig


@pytest.fixture(scope="module")
def prior():
    torch.manual_seed(0)
    cfg = LatentPriorConfig(codebook_size=8, code_dim=3, vq_width=8, strides=[4], res_depth=1, width=16,
                            n_layers=1, n_heads=2, context=8)
    model = LatentPrior(3, cfg)
    model.lqvae.quantizer.ema_update(torch.randn(64, 3))  # a codebook from random latents
    return model.eval()


def separator(prior, indices=(0, 1), alpha=(0.5, 0.5), **options):
    return LatentSeparator(prior, list(indices), torch.tensor(alpha), length=32, **options)


def brute_force(quantizer, log_priors, mix_code, alpha, sigma):
    """Every pair (i, j) by loops: the allowed values of log p1(i) + log p2(j) - ||m - B_Q(a1 e_i + a2 e_j)||^2
    / (2 sigma^2), one per code tied for nearest (the midpoint of two codes is as near to both)."""
    codebook, k = quantizer.codebook, quantizer.codebook.shape[0]
    allowed = {}
    for i, j in itertools.product(range(k), range(k)):
        summed = alpha[0] * codebook[i] + alpha[1] * codebook[j]
        distances = [float((summed - codebook[c]).pow(2).sum()) for c in range(k)]
        nearest = [c for c in range(k) if distances[c] <= min(distances) + 1e-5]
        allowed[i, j] = [float(log_priors[0, i] + log_priors[1, j]
                               - (mix_code - codebook[c]).pow(2).sum() / (2 * sigma**2)) for c in nearest]
    return allowed


def test_the_step_posterior_equals_a_brute_force_enumeration_of_all_pairs(prior):
    sep = separator(prior, alpha=(0.5, 0.5), sigma=0.3)
    torch.manual_seed(1)
    log_priors = torch.randn(2, 2, 8).log_softmax(-1)
    mix_code = torch.randn(2, 3)
    tuples, scores = sep.step_scores(log_priors, mix_code)
    for m in range(2):
        allowed = brute_force(prior.lqvae.quantizer, log_priors[m], mix_code[m], (0.5, 0.5), 0.3)
        got = {(int(i), int(j)): float(v) for (i, j), v in zip(tuples[m], scores[m])}
        assert set(got) == set(allowed)
        for pair, value in got.items():
            assert any(abs(value - a) < 1e-4 for a in allowed[pair]), (pair, value, allowed[pair])


def test_the_top_k_path_with_every_code_matches_the_exact_pairs(prior):
    torch.manual_seed(2)
    log_priors, mix_code = torch.randn(3, 2, 8).log_softmax(-1), torch.randn(3, 3)
    sep = separator(prior)
    exact_tuples, exact = sep.step_scores(log_priors, mix_code)
    top_tuples, top = sep.top_k_scores(log_priors, mix_code, 8)
    # Unquantised sums in the top-k path: never further from m than... the same prior terms, reordered.
    prior_exact = (log_priors[:, 0].gather(1, exact_tuples[..., 0]) + log_priors[:, 1].gather(1, exact_tuples[..., 1]))
    prior_top = (log_priors[:, 0].gather(1, top_tuples[..., 0]) + log_priors[:, 1].gather(1, top_tuples[..., 1]))
    assert torch.allclose(prior_exact.sort(dim=1).values, prior_top.sort(dim=1).values)
    assert top.shape == exact.shape == (3, 64)


def test_with_uniform_priors_the_choice_is_the_nearest_quantised_sum(prior):
    sep = separator(prior, sigma=0.01)
    quantizer = prior.lqvae.quantizer
    mix_code = torch.randn(4, 3)
    uniform = torch.full((4, 2, 8), -torch.log(torch.tensor(8.0)))
    tuples, scores = sep.step_scores(uniform, mix_code)
    best = tuples[torch.arange(4), scores.argmax(dim=1)]
    table = pair_sum_table(quantizer, torch.tensor([0.5, 0.5])).long()
    codebook = quantizer.codebook
    for m in range(4):
        distances = (mix_code[m] - codebook[table]).pow(2).sum(-1)  # [K, K]
        chosen = distances[best[m, 0], best[m, 1]]
        assert torch.isclose(chosen, distances.min())


def test_delta_likelihood_keeps_only_pairs_whose_sum_is_the_mixture_code(prior):
    sep = separator(prior, likelihood="delta")
    table = sep.sum_table().long()
    mix_code = prior.lqvae.quantizer.codebook[table[2, 5]].unsqueeze(0)  # a code some pair sums to
    tuples, scores = sep.step_scores(torch.zeros(1, 2, 8), mix_code)
    finite = torch.isfinite(scores[0])
    assert finite.any()
    assert (table[tuples[0, finite, 0], tuples[0, finite, 1]] == table[2, 5]).all()
    assert (table[tuples[0, ~finite, 0], tuples[0, ~finite, 1]] != table[2, 5]).all()


def test_the_pair_table_is_rebuilt_when_the_codebook_changes(prior):
    sep = separator(prior)
    first = sep.sum_table().clone()
    assert sep.sum_table() is sep.table  # cached
    saved = prior.lqvae.quantizer.codebook.clone()
    try:
        prior.lqvae.quantizer.codebook.mul_(-1.0).add_(torch.randn_like(saved))
        rebuilt = sep.sum_table()
        assert torch.equal(rebuilt, pair_sum_table(prior.lqvae.quantizer, torch.tensor([0.5, 0.5])))
        assert not torch.equal(rebuilt, first)
    finally:
        prior.lqvae.quantizer.codebook.copy_(saved)


def test_candidates_are_reproducible_per_mixture_seed_whatever_the_batch(prior):
    sep = separator(prior)
    torch.manual_seed(3)
    mixes = torch.randn(2, 32)
    together, trace = sep(mixes, 3, seeds=[11, 12])
    alone, _ = sep(mixes[1:], 3, seeds=[12])
    again, _ = sep(mixes, 3, seeds=[11, 12])
    assert together.shape == (2, 3, 2, 32) and trace["loglik"].shape == (2, 8)
    assert torch.equal(together[1], alone[0]) and torch.equal(together, again)
    other, _ = sep(mixes, 3, seeds=[11, 99])
    assert not torch.equal(other[1], together[1])


def test_more_than_two_sources_under_top_k_need_k_and_then_separate(prior):
    with pytest.raises(ValueError, match="latent_top_k"):
        separator(prior, indices=(0, 1, 2), alpha=(1 / 3,) * 3, search="topk")
    sep = separator(prior, indices=(0, 1, 2), alpha=(1 / 3,) * 3, top_k=3, search="topk")
    estimates, _ = sep(torch.randn(1, 32), 2, seeds=[0])
    assert estimates.shape == (1, 2, 3, 32) and torch.isfinite(estimates).all()
    assert sep.last_selection.shape == (2, 3)


def test_distances_under_bf16_autocast_are_the_float32_ones(prior):
    quantizer = prior.lqvae.quantizer
    saved = quantizer.codebook.clone()
    torch.manual_seed(4)
    log_priors = torch.randn(2, 2, 8).log_softmax(-1)
    mix_code = 100 + 0.01 * torch.randn(2, 3)
    latents = (100 + 0.01 * torch.randn(1, 3, 4)).to(torch.bfloat16)  # what the encoder gives under autocast
    try:
        # Codes 0.01 apart around 100, where bf16 steps by 0.5: bf16 distances would tie or round.
        quantizer.codebook.copy_(100 + 0.01 * torch.randn_like(saved))
        expected_scores = separator(prior).step_scores(log_priors, mix_code)[1]
        expected_codes = quantizer.quantise(latents.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scores = separator(prior).step_scores(log_priors, mix_code)[1]
            codes = quantizer.quantise(latents)
        assert codes.dtype == torch.float32 and torch.equal(codes, expected_codes)
        assert torch.equal(scores, expected_scores)
    finally:
        quantizer.codebook.copy_(saved)


def test_the_pair_grid_is_built_once(prior):
    sep = separator(prior)
    log_priors, mix_code = torch.randn(2, 2, 8).log_softmax(-1), torch.randn(2, 3)
    first = sep.step_scores(log_priors, mix_code)[0]
    second = sep.step_scores(log_priors, mix_code)[0]
    assert first.data_ptr() == second.data_ptr()  # one K^2 grid for every step, not a new one (and copy) per step


def test_a_low_temperature_draws_every_steps_most_probable_pair_whatever_the_seed(prior):
    torch.manual_seed(4)
    mixes = torch.randn(1, 32)
    sampled, _ = separator(prior, sigma=0.3)(mixes, 4, seeds=[5])
    assert not all(torch.equal(sampled[0, 0], sampled[0, c]) for c in range(1, 4))  # the posterior varies
    greedy = separator(prior, sigma=0.3, temperature=1e-4)
    first, _ = greedy(mixes, 4, seeds=[5])
    second, _ = greedy(mixes, 4, seeds=[6])
    assert all(torch.equal(first[0, 0], first[0, c]) for c in range(1, 4))
    assert torch.equal(first, second)
    with pytest.raises(ValueError, match="latent_temperature must be > 0"):
        separator(prior, temperature=0)


@pytest.mark.parametrize("overlap, window, starts", [(0, None, [8]), (4, None, [8, 12]), (0, 4, [4, 8, 12]),
                                                     (2, 4, [4, 6, 8, 10, 12, 14])])
def test_each_new_window_is_first_fed_the_last_overlap_codes(prior, overlap, window, starts):
    """Context 8, 16 steps: a new window opens at each of ``starts``. Near-greedy draws make the chosen pair
    the argmax of the recorded scores, so the codes can be rebuilt and fed to a fresh cache."""
    torch.manual_seed(5)
    mix = torch.randn(1, 64)
    sep = LatentSeparator(prior, [0, 1], torch.tensor([0.5, 0.5]), length=64, sigma=0.3, temperature=1e-6,
                          overlap=overlap, window=window)
    recorded, step_scores = [], sep.step_scores

    def recording(log_priors, mix_code):
        tuples, scores = step_scores(log_priors, mix_code)
        recorded.append((log_priors.clone(), tuples[0, scores[0].argmax()]))
        return tuples, scores

    sep.step_scores = recording
    sep(mix, 1, seeds=[0])
    codes = torch.stack([chosen for _, chosen in recorded])  # [16, 2]
    assert [s for s in range(16) if sep.window_starts(s)] == [0] + starts
    for s in starts:
        cache, previous = prior.transformer.new_cache(1), None
        for j in range(s - overlap, s + 1):
            logits = prior.transformer.step(previous, cache)
            if j < s:
                previous = torch.zeros(1, 3, dtype=torch.long)
                previous[0, :2] = codes[j]
        expected = logits.float()[:, :2].log_softmax(-1)
        assert torch.allclose(recorded[s][0], expected, atol=1e-5), s


def test_windows_must_fit_the_context_and_hold_more_than_their_overlap(prior):
    with pytest.raises(ValueError, match="latent_overlap must be in"):
        LatentSeparator(prior, [0, 1], torch.tensor([0.5, 0.5]), length=64, overlap=8)
    with pytest.raises(ValueError, match="latent_overlap must be in"):
        LatentSeparator(prior, [0, 1], torch.tensor([0.5, 0.5]), length=64, overlap=4, window=4)
    with pytest.raises(ValueError, match="latent_window must be in"):
        LatentSeparator(prior, [0, 1], torch.tensor([0.5, 0.5]), length=64, window=9)


def every_prior_log_probs(prior, stream):
    """[S] codes of one source -> [S, all priors, K]: each class prior's next-code log-probabilities given that
    source's past (a full forward, one window)."""
    codes = stream.view(1, 1, -1).expand(1, prior.transformer.n_groups, -1)
    return prior.transformer(codes).float().log_softmax(-1)[0].transpose(0, 1)


def test_a_large_contrast_draws_each_sources_code_by_its_ratio_to_the_pooled_prior(prior):
    """Mixture ignored (sigma huge), near-greedy draws, contrast huge: each source's code at each step is the
    argmax of log p_own - log mean_k p_k, every class prior fed that source's own drawn past."""
    torch.manual_seed(6)
    sep = separator(prior, sigma=1e4, temperature=1e-6, contrast=1e4)
    assert sep.extra_choice_names == ("consistent", "class_ratio")
    recorded = []
    step_scores = sep.step_scores
    sep.step_scores = lambda lp, mc: recorded.append(step_scores(lp, mc)) or recorded[-1]
    sep(torch.randn(1, 32), 1, seeds=[1])
    chosen = torch.stack([tuples[0, scores[0].argmax()] for tuples, scores in recorded])  # [8, 2]
    ratio_total = 0.0
    for n in range(2):
        every = every_prior_log_probs(prior, chosen[:, n])  # [8, 3, K]
        ratio = every[:, n] - (every.logsumexp(1) - torch.log(torch.tensor(3.0)))
        assert torch.equal(ratio.argmax(-1), chosen[:, n])
        ratio_total += ratio.gather(1, chosen[:, n:n + 1]).sum()
    assert torch.allclose(sep.last_class_ratio, ratio_total.view(1, 1), atol=1e-4)


def test_contrast_zero_keeps_the_paper_posterior_and_adds_the_class_ratio_row(prior):
    torch.manual_seed(7)
    mixes = torch.randn(2, 32)
    paper, _ = separator(prior, sigma=0.3)(mixes, 3, seeds=[1, 2])
    zero = separator(prior, sigma=0.3, contrast=0)
    same, _ = zero(mixes, 3, seeds=[1, 2])
    assert torch.allclose(same, paper, atol=1e-5)
    assert set(zero.extra_choices(mixes, same)) == {"consistent", "class_ratio"}
    assert "class_ratio" not in separator(prior).extra_choices(mixes, paper)
    with pytest.raises(ValueError, match="latent_contrast must be >= 0"):
        separator(prior, contrast=-1)
