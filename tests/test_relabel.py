"""Relabelling a diffusion chain's sources by the priors' best permutation (samplers/relabel.py)."""
import itertools

import pytest
import torch

from lightning_modules.nn.gaussian_prior import GaussianPrior
from lightning_modules.samplers.diffusion import DiffusionSeparator
from lightning_modules.samplers.relabel import best_permutations, relabel

MEANS, STDS = [1.0, -1.0, 0.0], [0.05, 0.05, 0.05]


class Selecting(GaussianPrior):
    """A Gaussian prior whose selection score is its log density (what the score family's proxy stands for)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.calls = []

    def selection_score(self, x):
        return self.log_prob(x)

    def score(self, x, sigma):
        self.calls.append(float(sigma))
        return super().score(x, sigma)


def test_best_permutation_is_the_exhaustive_maximum_not_the_greedy_one():
    # Row-wise greedy takes content 0 for prior 0 and is then forced into the bad pair (1 -> 1): total 10 + 0.
    fitness = torch.tensor([[[10.0, 9.0], [9.0, 0.0]]])
    assert best_permutations(fitness).tolist() == [[1, 0]]  # 9 + 9
    generator = torch.Generator().manual_seed(0)
    fitness = torch.randn(20, 4, 4, generator=generator)
    chosen = best_permutations(fitness)
    for m in range(20):
        totals = {p: sum(fitness[m, i, p[i]].item() for i in range(4)) for p in itertools.permutations(range(4))}
        assert tuple(chosen[m].tolist()) == max(totals, key=totals.get)
    assert best_permutations(torch.zeros(1, 3, 3)).tolist() == [[0, 1, 2]]  # ties keep the labels


@pytest.mark.parametrize("weights", [[1 / 3, 1 / 3, 1 / 3], [0.5, 0.2, 1.0]])
def test_relabel_moves_each_content_to_the_prior_that_likes_it_and_keeps_the_mixture(weights):
    alpha = torch.tensor(weights)
    prior = Selecting(MEANS, STDS)
    generator = torch.Generator().manual_seed(1)
    clean = torch.tensor(MEANS).view(1, 3, 1) + 0.05 * torch.randn(2, 3, 64, generator=generator)
    # Chain 0 holds source 1's content in slot 0 and source 0's in slot 1 (rescaled so the sum is m); chain 1
    # is right already.
    swapped = clean.clone()
    swapped[0, 0], swapped[0, 1] = alpha[1] * clean[0, 1] / alpha[0], alpha[0] * clean[0, 0] / alpha[1]
    mix = (alpha.view(1, 3, 1) * swapped).sum(dim=1)
    out, moved = relabel(prior, swapped, 1e-3, alpha)
    assert moved.tolist() == [True, False]
    torch.testing.assert_close(out, clean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close((alpha.view(1, 3, 1) * out).sum(dim=1), mix, rtol=1e-5, atol=1e-5)


def test_the_separator_relabels_once_per_listed_sigma_and_keeps_the_constraint():
    alpha = torch.full((3,), 1 / 3)
    prior = Selecting(MEANS, STDS)
    mix = torch.zeros(1, 32)
    separator = DiffusionSeparator(prior, alpha, sigma_max=1.0, sigma_min=0.01, steps=10, solver="euler",
                                   constraint="projected", relabel_sigmas=[0.5, 0.05, 2.0, 1.5])
    samples, _ = separator(mix, n_chains=2, seeds=[0])
    steps = len(separator.sigmas) - 1
    # One score call per Euler step, plus one per relabelling at the first level at or below 2.0 and 1.5 (both
    # the top level, so once), 0.5 and 0.05.
    assert len(prior.calls) == steps + 3
    relabel_levels = [s for s in separator.sigmas[:-2] if prior.calls.count(s) == 2]
    expected = [next(s for s in separator.sigmas if s <= limit) for limit in (2.0, 0.5, 0.05)]
    assert relabel_levels == expected
    mixed = (alpha.view(1, 1, 3, 1) * samples).sum(dim=2)
    torch.testing.assert_close(mixed, mix.view(1, 1, 32).expand(1, 2, 32), atol=1e-5, rtol=0)


def test_relabelling_needs_a_selection_score():
    with pytest.raises(ValueError, match="selection_score"):
        DiffusionSeparator(GaussianPrior(MEANS, STDS), torch.full((3,), 1 / 3), relabel_sigmas=[0.1])
    with pytest.raises(ValueError, match="positive"):
        DiffusionSeparator(Selecting(MEANS, STDS), torch.full((3,), 1 / 3), relabel_sigmas=[0.0])
