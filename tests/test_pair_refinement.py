"""Pairwise re-separation after an N-source diffusion run (samplers/pair_refinement.py)."""
import itertools

import pytest
import torch

from lightning_modules.nn.gaussian_prior import GaussianPrior
from lightning_modules.samplers.diffusion import DiffusionSeparator
from lightning_modules.samplers.pair_refinement import PairView, refine_pairs, round_robin

MEANS, STD = [1.0, -1.0, 0.5, -0.5], 0.05
ALPHA = torch.full((4,), 0.25)


class Selecting(GaussianPrior):
    """A Gaussian prior whose selection score is its log density (what the score family's proxy stands for)."""

    def selection_score(self, x):
        return self.log_prob(x)


def prior():
    return Selecting(MEANS, [STD] * 4)


def pair_sampler(view):
    return DiffusionSeparator(view, [0.25, 0.25], sigma_max=2.0, sigma_min=0.01, steps=30, solver="heun",
                              dirac_derived="rotate")


def clean_sources(count=3, length=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.tensor(MEANS).view(1, 4, 1) + STD * torch.randn(count, 4, length, generator=generator)


@pytest.mark.parametrize("n_sources", range(2, 8))
def test_round_robin_pairs_every_two_sources_once_in_disjoint_rounds(n_sources):
    rounds = round_robin(n_sources)
    assert len(rounds) == (n_sources - 1 if n_sources % 2 == 0 else n_sources)
    seen = [pair for pairs in rounds for pair in pairs]
    assert sorted(seen) == list(itertools.combinations(range(n_sources), 2))
    for pairs in rounds:
        members = [k for pair in pairs for k in pair]
        assert len(members) == len(set(members)) == 2 * (n_sources // 2)


def test_pair_view_asks_each_prior_at_its_own_slot_and_leaves_the_rest():
    model = prior()
    view = PairView(model)
    generator = torch.Generator().manual_seed(1)
    background = torch.randn(3, 4, 16, generator=generator)
    pairs = [(0, 3), (1, 2)]
    view.set_round(pairs, background)
    y = torch.randn(6, 2, 16, generator=generator)
    out = view.score(y, 0.3)
    for p, (i, j) in enumerate(pairs):
        rows = slice(3 * p, 3 * (p + 1))
        for slot, k in enumerate((i, j)):
            full = torch.zeros(3, 4, 16)
            full[:, k] = y[rows, slot]
            torch.testing.assert_close(out[rows, slot], model.score(full, 0.3)[:, k])
    torch.testing.assert_close(view.full(y)[:, [0, 3]], torch.stack([y[:3, 0], y[:3, 1]], dim=1))
    assert view.background is background and background.shape == (3, 4, 16)


def test_one_sweep_moves_swapped_components_home_and_keeps_the_mixture():
    clean = clean_sources()
    swapped = clean[:, [1, 0, 3, 2]]  # every slot holds another class's content; equal weights keep the sum
    mix = (ALPHA.view(1, 4, 1) * swapped).sum(dim=1)
    view = PairView(prior())
    out, accepted = refine_pairs(pair_sampler(view), view, swapped.clone(), ALPHA, seeds=[0, 1, 2], sweeps=1)
    assert (swapped.mean(dim=2) - torch.tensor(MEANS)).abs().min() > 0.4  # every slot wrong before
    assert (out.mean(dim=2) - torch.tensor(MEANS)).abs().max() < 0.1  # every slot at its own class after
    torch.testing.assert_close((ALPHA.view(1, 4, 1) * out).sum(dim=1), mix, atol=1e-5, rtol=0)
    assert accepted >= 3 * 2  # at least one round's two pairs in every chain


class Proposing:
    """A 'sampler' that proposes two fixed splits of every pair's sum: (all in the first source, none) and
    (a share, the rest)."""

    def __init__(self, share):
        self.share = share

    def __call__(self, sums, n_chains, seeds):
        whole = sums / 0.25
        splits = [torch.stack([whole, torch.zeros_like(whole)], dim=1),
                  torch.stack([self.share, whole - self.share], dim=1)]
        return torch.stack(splits, dim=1), {}


def test_a_pair_takes_the_better_proposal_and_never_a_worse_split():
    clean = clean_sources()
    view = PairView(prior())
    bad_share = torch.zeros(2 * 3, 64)  # 2 pairs per round x 3 chains
    kept, accepted = refine_pairs(Proposing(bad_share), view, clean.clone(), ALPHA, [0, 1, 2], sweeps=1)
    assert accepted == 0
    torch.testing.assert_close(kept, clean)
    swapped = clean[:, [1, 0, 3, 2]]
    model = prior()

    class Truthful(Proposing):  # the second proposal is the true split of whatever pair is asked
        def __call__(self, sums, n_chains, seeds):
            firsts = torch.cat([clean[:, i] for i, _ in view.pairs])
            self.share = firsts
            return super().__call__(sums, n_chains, seeds)

    out, accepted = refine_pairs(Truthful(None), view, swapped.clone(), ALPHA, [0, 1, 2], sweeps=1)
    assert model.log_prob(out).sum() > model.log_prob(swapped).sum()
    torch.testing.assert_close(out, clean)  # the last round pairs (0, 1) and (2, 3): the truth, proposed second


def test_separator_refines_pairs_per_mixture_whatever_shares_its_batch():
    separator = DiffusionSeparator(prior(), ALPHA, sigma_max=1.0, sigma_min=0.01, steps=8, solver="euler",
                                   pair_sweeps=1)
    mix = (ALPHA.view(1, 4, 1) * clean_sources(2, 32)).sum(dim=1)
    together, _ = separator(mix, n_chains=2, seeds=[5, 6])
    alone, _ = separator(mix[1:], n_chains=2, seeds=[6])
    torch.testing.assert_close(together[1:], alone)
    torch.testing.assert_close((ALPHA.view(1, 1, 4, 1) * together).sum(dim=2), mix.unsqueeze(1).expand(2, 2, 32),
                               atol=1e-5, rtol=0)
    assert separator.pair_moves > 0


def test_pair_refinement_refuses_unequal_weights_and_a_missing_selection_score():
    with pytest.raises(ValueError, match="equal mixing weights"):
        DiffusionSeparator(prior(), torch.tensor([0.1, 0.2, 0.3, 0.4]), pair_sweeps=1)
    with pytest.raises(ValueError, match="selection_score"):
        DiffusionSeparator(GaussianPrior(MEANS, [STD] * 4), ALPHA, pair_sweeps=1)
    with pytest.raises(ValueError, match="pair_sweeps >= 0"):
        DiffusionSeparator(prior(), ALPHA, pair_sweeps=-1)


def test_pair_runs_take_their_own_schedule_when_asked():
    separator = DiffusionSeparator(prior(), ALPHA, steps=20, corrections=2, pair_sweeps=1, pair_steps=5,
                                   pair_corrections=0)
    pair_sampler = separator._pairs[1]
    assert len(pair_sampler.sigmas) == 5 + 1 and pair_sampler.corrections == 0
    assert pair_sampler.alpha.tolist() == [0.25, 0.25] and not pair_sampler.relabel_sigmas
    assert pair_sampler.dirac_derived == "rotate"
    same = DiffusionSeparator(prior(), ALPHA, steps=20, corrections=2, pair_sweeps=1)._pairs[1]
    assert len(same.sigmas) == 20 + 1 and same.corrections == 2
    assert DiffusionSeparator(prior(), ALPHA[:2] * 2, pair_sweeps=1)._pairs is None  # two sources: nothing to pair
