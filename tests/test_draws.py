"""The categorical draw of the latent posterior: the right frequencies, never an impossible index, one seed one
draw."""
import torch

from lightning_modules.samplers.draws import categorical_draw


def test_frequencies_follow_the_probabilities_and_zero_mass_is_never_drawn():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    draws = categorical_draw(probs.expand(40000, -1), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=6).double() / draws.numel()
    assert counts[[0, 2, 5]].sum() == 0
    # 40000 draws: the binomial standard deviation is at most 0.0025.
    assert torch.allclose(counts, probs.double(), atol=0.01), counts


def test_each_row_draws_from_its_own_distribution():
    probs = torch.eye(5)[[3, 0, 4, 4, 1]]
    assert categorical_draw(probs, torch.Generator().manual_seed(1)).tolist() == [3, 0, 4, 4, 1]


def test_the_same_seed_gives_the_same_draws():
    probs = torch.rand(8, 1000).softmax(dim=-1)
    first = categorical_draw(probs, torch.Generator().manual_seed(3))
    assert torch.equal(first, categorical_draw(probs, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, categorical_draw(probs, torch.Generator().manual_seed(4)))
