"""Pairwise re-separation: block Gibbs moves that let a diffusion chain exchange whole components.

With four sources a chain commits early to an assignment: a slot takes another class's fundamental or splits
one source's harmonics with a neighbour, every slot looks plausible to its own prior, the sum is exact, and no
local move undoes it (see docs/separation.md). With two sources the same priors and sampler land on the truth
(+42 dB on sine + square). So after the N-source run, each pair (i, j) of sources is re-separated on its own:
its current sum r_ij = alpha_i x_i + alpha_j x_j is held fixed and fresh two-source diffusion runs, from
sigma_max with the Dirac constraint, split r_ij between priors i and j. Every such move keeps g(x) = m exactly,
and a component that sits in the wrong slot can leave it in the round where that slot is paired with the
component's class. Which source of a pair the Dirac constraint derives decides what the run finds (validation
sine + triangle: -19.6 dB SI-SDRi deriving the triangle, +15.1 deriving the sine), so every pair is run twice,
deriving each of its sources once, and the better split by the priors is proposed.

The pairs of one round are disjoint (a round-robin tournament: N - 1 rounds of N / 2 pairs for even N, N rounds
with one source resting for odd N), so one round is one batched run of the grouped priors: no prior is asked
twice per call. A pair's new split is kept only when the sum of its two selection scores (minus the weighted
denoising loss, the proxy ``relabel`` uses; the priors rank the true sources above the sampler's estimates on 32
of 32 validation mixtures) is higher than the old one's: a greedy block move, not a Gibbs step of the exact
posterior.
"""
import torch
from torch import nn


def round_robin(n_sources):
    """Rounds of disjoint pairs covering every pair once (the circle method; odd N: one source rests per round)."""
    slots = list(range(n_sources)) + ([None] if n_sources % 2 else [])
    rounds = []
    for _ in range(len(slots) - 1):
        half = len(slots) // 2
        pairs = [(slots[k], slots[-1 - k]) for k in range(half)]
        rounds.append([tuple(sorted(p)) for p in pairs if None not in p])
        slots = [slots[0], slots[-1]] + slots[1:-1]
    return rounds


class PairView(nn.Module):
    """The grouped N-source priors seen as a batch of two-source problems, one per pair of the current round.

    ``score(y [P * M * R, 2, T], sigma)``: rows p * M * R .. (p + 1) * M * R - 1 are pair p's (x_i, x_j) for the
    M chains of x, R rows each (the pair sampler's own chains);
    they are placed in their slots of one [M, N, T] call (a resting source keeps its current estimate there, its
    score is not read) and the scores are read back in the same layout."""

    def __init__(self, prior):
        super().__init__()
        self.prior = prior
        self.noise_conditional = getattr(prior, "noise_conditional", False)
        self.pairs, self.background = None, None

    def set_round(self, pairs, x):
        self.pairs, self.background = pairs, x

    def full(self, y):
        # The sampler may run several chains per pair sum: then y's rows are (pair, chain of x, its chain).
        repeats = y.shape[0] // (len(self.pairs) * self.background.shape[0])
        x = self.background.repeat_interleave(repeats, dim=0)
        count = x.shape[0]
        for p, (i, j) in enumerate(self.pairs):
            x[:, i], x[:, j] = y[p * count:(p + 1) * count, 0], y[p * count:(p + 1) * count, 1]
        return x

    def split(self, out):
        return torch.cat([out[:, [i, j]] for i, j in self.pairs])

    def score(self, y, sigma):
        if torch.is_tensor(sigma) and sigma.dim() > 0:
            raise ValueError("PairView serves one sigma per call (a pair of equal weights never needs two)")
        return self.split(self.prior.score(self.full(y), sigma))


def check_pairs(score_model, alpha, sweeps):
    """A ValueError naming what is wrong with these pair-refinement settings, before any chain runs."""
    if sweeps < 0:
        raise ValueError(f"need diffusion_pair_sweeps >= 0, got {sweeps}")
    if not sweeps or len(alpha) < 3:
        return
    if not torch.allclose(alpha, alpha[:1].expand_as(alpha)):
        raise ValueError(f"diffusion_pair_sweeps needs equal mixing weights (one two-source run serves every pair), "
                         f"got {alpha.tolist()}")
    if getattr(score_model, "selection_score", None) is None:
        raise ValueError("diffusion_pair_sweeps needs priors with a selection_score (the score family) to judge "
                         "the new splits")


@torch.no_grad()
def refine_pairs(pair_sampler, view, x, alpha, seeds, sweeps):
    """x [M, N, T] (M = B * C chains, ``seeds`` one per row) -> x after ``sweeps`` round-robins of pair runs, and
    the number of pair moves accepted. ``pair_sampler`` is a two-source DiffusionSeparator over ``view`` whose
    chain c derives source 1 - c of the pair (dirac_derived="rotate"); it is run with two chains. The settings
    were checked once, by ``check_pairs``, when the N-source sampler was built."""
    selection = view.prior.selection_score
    weight = float(alpha[0])
    generators = [torch.Generator().manual_seed(int(s) + 7919) for s in seeds]  # a stream per chain
    current = selection(x).float()
    accepted = 0
    for _ in range(sweeps):
        for pairs in round_robin(x.shape[1]):
            view.set_round(pairs, x)
            sums = torch.cat([weight * (x[:, i] + x[:, j]) for i, j in pairs])  # [P * M, T]
            pair_seeds = [int(torch.randint(2**31 - 1, (1,), generator=g)) for _ in pairs for g in generators]
            new, _ = pair_sampler(sums, 2, pair_seeds)  # [P * M, 2 derivations, 2, T]
            for derivation in range(new.shape[1]):
                proposal = view.full(new[:, derivation])
                scores = selection(proposal).float()
                for i, j in pairs:
                    better = (scores[:, i] + scores[:, j]) > (current[:, i] + current[:, j])
                    x[better, i], x[better, j] = proposal[better, i], proposal[better, j]
                    current[better, i], current[better, j] = scores[better, i], scores[better, j]
                    accepted += int(better.sum())
    return x, accepted
