"""separation.mixture_consistency: the projection of the estimates onto the mixture, and where the loop applies it."""
import torch
from torch import nn

from lightning_modules.metrics.separation_metrics import si_sdr
from lightning_modules.samplers.mixture_projection import project_to_mixture
from lightning_modules.separation import SeparationModule


def constrained_least_squares(mix, estimates, alpha):
    """min sum_k ||x_k - e_k||^2 subject to sum_k alpha_k x_k = m, solved through its KKT system, one time
    sample at a time (the problem separates over samples)."""
    n = alpha.numel()
    kkt = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    kkt[:n, :n] = 2 * torch.eye(n, dtype=torch.float64)
    kkt[:n, n] = alpha
    kkt[n, :n] = alpha
    rhs = torch.cat([2 * estimates.T, mix[:, None]], dim=1).T  # [n + 1, T]
    return torch.linalg.solve(kkt, rhs)[:n]


def test_the_projection_is_the_nearest_estimate_whose_mix_is_the_mixture():
    generator = torch.Generator().manual_seed(0)
    for alpha in (torch.tensor([0.25] * 4), torch.tensor([1.0, 1.0]), torch.tensor([0.2, 0.3, 0.5])):
        alpha = alpha.double()
        mix = torch.randn(64, generator=generator, dtype=torch.float64)
        estimates = torch.randn(alpha.numel(), 64, generator=generator, dtype=torch.float64)
        projected = project_to_mixture(mix, estimates, alpha)
        torch.testing.assert_close((alpha[:, None] * projected).sum(0), mix)
        torch.testing.assert_close(projected, constrained_least_squares(mix, estimates, alpha))
    # Batched: [B, C, N, T] estimates against [B, 1, T] mixtures.
    batch = torch.randn(2, 3, 4, 32, generator=generator, dtype=torch.float64)
    mixes = torch.randn(2, 32, generator=generator, dtype=torch.float64)
    projected = project_to_mixture(mixes.unsqueeze(1), batch, torch.full((4,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(projected.mean(dim=2), mixes.unsqueeze(1).expand(2, 3, 32))


class Ranking(nn.Module):
    """Prefers chain 1 of every mixture, whatever the audio."""

    def selection_score(self, x):
        score = torch.zeros(x.shape[0], x.shape[1])
        score[1::3] = 1.0
        return score


class FixedSeparator(nn.Module):
    """Three chains per mixture: the references plus noise of shrinking size, so chain 2 mixes closest to m."""
    extra_choice_names = ("consistent",)

    def __init__(self, references):
        super().__init__()
        self.register_buffer("alpha", torch.tensor([0.5, 0.5]))
        self.n_steps, self.trace_sigmas, self.nonfinite_steps = 1, [1.0], 0
        self.score_model = Ranking()
        noise = torch.randn(references.shape[0], 3, *references.shape[1:], generator=torch.Generator().manual_seed(1))
        self.chains = references.unsqueeze(1) + noise * torch.tensor([1.0, 0.5, 0.1])[None, :, None, None]

    def forward(self, mix, n_chains, seeds):
        return self.chains.clone(), {"loglik": torch.zeros(mix.shape[0], 1), "mix_error": torch.zeros(mix.shape[0], 1)}

    def extra_choices(self, mix, estimates):
        self.seen = estimates
        error = (mix[:, None] - (self.alpha[:, None] * estimates).sum(2)).pow(2).mean(-1)
        return {"consistent": error.argmin(dim=1)}


def separate(consistency):
    references = torch.randn(2, 2, 128, generator=torch.Generator().manual_seed(0))
    mix = 0.5 * references.sum(1)
    module = SeparationModule(FixedSeparator(references), ["a", "b"], "fixed", n_chains=3, museval=False,
                              mixture_consistency=consistency)
    module.on_test_epoch_start()
    module.test_step({"mix": mix, "sources": references, "index": torch.arange(2)}, 0)
    return {(row["index"], row["method"]): row for row in module.rows}, module.separator, mix, references


def test_the_loop_scores_projected_estimates_but_ranks_the_chains_on_the_samplers_own():
    raw_rows, _, _, _ = separate(False)
    rows, separator, mix, references = separate(True)
    projected = project_to_mixture(mix.unsqueeze(1), separator.chains, separator.alpha)
    assert torch.equal(separator.seen, separator.chains)  # the consistency choice saw the unprojected chains
    for index in range(2):
        # The choices are those of the sampler's own chains: the ranking's chain 1 and the closest mix, chain 2.
        assert rows[index, "fixed_selected_of_3"]["chain"] == raw_rows[index, "fixed_selected_of_3"]["chain"] == 1
        assert rows[index, "fixed_consistent_of_3"]["chain"] == raw_rows[index, "fixed_consistent_of_3"]["chain"] == 2
        for method in ("fixed", "fixed_selected_of_3", "fixed_consistent_of_3", "fixed_oracle_of_3"):
            row = rows[index, method]
            assert row["mix_error"] < 1e-10 < raw_rows[index, method]["mix_error"]
            expected = si_sdr(projected[index, row["chain"]], references[index]).mean()
            assert abs(row["si_sdr"] - float(expected)) < 1e-4
        assert rows[index, "fixed_selected_of_3"]["si_sdr"] > raw_rows[index, "fixed_selected_of_3"]["si_sdr"]
