"""SourceSubset scores a subset of a family's sources exactly as the full family scores them, whatever the
dropped channels hold, and keeps the gradient of each source's score on that source alone."""
import pytest
import torch

from lightning_modules.nn.gaussian_prior import GaussianPrior
from lightning_modules.nn.source_subset import SourceSubset
from lightning_modules.prior_registry import build_prior

ALL = ["sine", "square", "saw", "triangle"]
KEPT = ["triangle", "square", "sine"]  # out of order, one dropped


def family(name):
    """A family of four independent priors with random (not identity-like) weights."""
    if name == "gaussian":
        return GaussianPrior([0.1, -0.2, 0.0, 0.3], [0.2, 0.1, 0.3, 0.15])
    options = {"flowavenet": {"name": "flowavenet", "n_blocks": 2, "n_flows": 2, "n_layers": 2, "width": 8},
               "wavenet": {"name": "wavenet", "n_blocks": 1, "n_layers": 3, "width": 8, "n_classes": 32,
                           "likelihood": "smoothed"}}[name]
    torch.manual_seed(0)
    prior = build_prior(options, len(ALL))
    with torch.no_grad():
        for parameter in prior.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return prior.eval()


@pytest.mark.parametrize("name", ["gaussian", "flowavenet", "wavenet"])
def test_subset_scores_equal_the_full_family_for_any_dropped_content(name):
    prior = family(name)
    subset = SourceSubset(prior, ALL, KEPT)
    columns = [ALL.index(s) for s in KEPT]
    kept = 0.3 * torch.randn(2, len(KEPT), 64)
    scores = subset.log_prob(kept)
    assert scores.shape == (2, len(KEPT))
    for dropped in (torch.zeros(2, 64), 0.5 * torch.randn(2, 64), torch.full((2, 64), 0.9)):
        full = torch.zeros(2, len(ALL), 64)
        full[:, columns] = kept
        full[:, ALL.index("saw")] = dropped
        torch.testing.assert_close(scores, prior.log_prob(full)[:, columns], rtol=1e-5, atol=1e-5)
    # All sources in their own order: the family itself.
    x = 0.3 * torch.randn(2, len(ALL), 64)
    torch.testing.assert_close(SourceSubset(prior, ALL, ALL).log_prob(x), prior.log_prob(x))


@pytest.mark.parametrize("name", ["gaussian", "flowavenet", "wavenet"])
def test_each_source_score_has_gradient_on_its_own_channel_only(name):
    subset = SourceSubset(family(name), ALL, KEPT)
    x = (0.3 * torch.randn(2, len(KEPT), 64)).requires_grad_(True)
    scores = subset.log_prob(x)
    for i in range(len(KEPT)):
        (grad,) = torch.autograd.grad(scores[:, i].sum(), x, retain_graph=True)
        assert grad[:, i].abs().sum() > 0
        others = [j for j in range(len(KEPT)) if j != i]
        assert torch.equal(grad[:, others], torch.zeros_like(grad[:, others])), (i, grad[:, others].abs().max())


def test_an_unknown_source_is_a_clear_error():
    with pytest.raises(ValueError, match="violin.*no prior"):
        SourceSubset(family("gaussian"), ALL, ["sine", "violin"])
