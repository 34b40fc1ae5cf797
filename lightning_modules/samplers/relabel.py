"""Relabelling a diffusion chain's sources by the priors: a mode jump for the permutation problem.

With N similar sources (a sine and a triangle, a square and a saw) a chain often commits early to the wrong
assignment: the sine's slot takes the square's fundamental, the square's slot the sine's, and from then on
every local move (Euler, churn, corrections) keeps the sum m and the wrong labels. The two assignments are far
apart in x, but they are one permutation apart in what each slot contributes to the mixture.

At a chosen noise level each chain's contributions c_j = alpha_j D(x, sigma)_j (Tweedie's estimates of the
clean sources) are offered to every prior: fitness[i, j] = how much prior i likes c_j / alpha_i (its
``selection_score``: minus its weighted denoising loss, a proxy for log p_i). The chain takes the permutation
with the largest total fitness and moves its noisy state with it: source i becomes alpha_pi(i) x_pi(i) /
alpha_i. That keeps g(x) = m exactly, so it composes with every constraint. It is a greedy jump on a proxy
density, not a Metropolis-Hastings step: with the priors' log densities ~4096 samples apart the two would
rarely differ, but the chain is no longer an exact posterior sampler where it relabels.
"""
import itertools

import torch

MAX_SOURCES = 8  # the search is exhaustive over the N! permutations (40320 at 8)


def best_permutations(fitness):
    """fitness [M, N, N] (row i: prior i, column j: content j) -> [M, N] long: the content each source takes,
    maximising sum_i fitness[i, perm[i]] (the identity wins ties)."""
    n = fitness.shape[1]
    perms = torch.tensor(list(itertools.permutations(range(n))), device=fitness.device)  # identity first
    rows = torch.arange(n, device=fitness.device)
    totals = fitness[:, rows, perms].sum(dim=-1)  # [M, N!]
    return perms[totals.argmax(dim=1)]


def fitness_matrix(score_model, contents, alpha):
    """[M, N, N]: prior i's selection score of content j rescaled to source i's weight, N calls of N sources."""
    count, n = contents.shape[:2]
    fitness = torch.empty(count, n, n, device=contents.device)
    rows = torch.arange(n, device=contents.device)
    for shift in range(n):
        columns = (rows + shift) % n  # slot i holds content (i + shift) % N: every pair once over the shifts
        fitness[:, rows, columns] = score_model.selection_score(contents[:, columns] / alpha).float()
    return fitness


@torch.no_grad()
def relabel(score_model, x, sigma, alpha):
    """x [M, N, T] at noise level sigma -> (x with each chain's contents permuted, [M] bool: relabelled)."""
    alpha = alpha.view(1, -1, 1)
    clean = x + sigma**2 * score_model.score(x, float(sigma)).float()  # Tweedie: D(x, sigma)
    perms = best_permutations(fitness_matrix(score_model, alpha * clean, alpha))
    moved = (perms != torch.arange(x.shape[1], device=x.device)).any(dim=1)
    index = perms.unsqueeze(-1).expand_as(x)
    return torch.gather(alpha * x, 1, index) / alpha, moved
