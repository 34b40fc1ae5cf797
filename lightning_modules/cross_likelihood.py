"""Cross-likelihood evaluation as a trainer ``test`` loop (paper 003 Fig. 3/4, Table 1; thesis Fig. 16).

Works for any prior family that keeps the contract ``log_prob(x: [B, N, T]) -> [B, N]``. Sums and
counts (not per-rank means) are reduced across DDP ranks, and the noise added to example i depends
only on i, so the result does not depend on the number of processes or the batch size.

A family with ``denoising_losses(x, sigmas, seed) -> [S, B, N]`` (the score priors) also gets the cheap
per-sigma denoising-loss matrix: ``mse[s][k][j]`` = mean over test examples of prior j's denoising MSE
||D_j(x_k + sigma_s eps, sigma_s) - x_k||^2 / T on source k's clean example (noise fixed per example).
It is not a likelihood, only a second view of which prior explains which source.

Per-crop values for the discrimination report (callbacks/discrimination.py) are kept too, gathered over ranks
and ordered by example index: every prior's log-likelihood of every source's (noisy) crop, the pooled
prior's (``pooled_priors``, one prior of the family trained on all sources; None where none was trained at
that level) and the crop's length under a lossless coder (lightning_modules/metrics/coder_length.py), for a family
whose log_prob is a density only (see DISCRETE_COMPLEXITY).
"""
import math

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import nn

from lightning_modules.metrics.coder_length import check_bit_depth, coder_length, describe

INPUT_KINDS = ("constant 0", "constant 1", "gaussian std 0.5")
# The complexity correction log p(x) + log(step) + L(x) turns a density into the probability of the 16-bit crop
# and compares it with FLAC's code of that crop. A family flagged ``discrete_likelihood`` (mu-law WaveNet, LQ-VAE
# code priors) gives probabilities of its own classes or codes instead: adding log(step) would mix units, and a
# density would need an assumption the model does not make (e.g. uniform within each mu-law bin). No score then.
DISCRETE_COMPLEXITY = ("the priors give probabilities of discrete classes or codes, not a waveform density: "
                       "log(step) + L(x) does not apply")
DENOISING_LABEL = ("denoising MSE ||D_j(x_k + sigma eps, sigma) - x_k||^2 / T (lower = prior j explains source k "
                   "better); not a likelihood")


def synthetic_input(kind, n_examples, n_sources, length, seed=0):
    """Paper 003 Table 1 inputs: constants and N(0, 0.5^2) noise, the same for every prior."""
    if kind == "constant 0":
        return torch.zeros(n_examples, n_sources, length)
    if kind == "constant 1":
        return torch.ones(n_examples, n_sources, length)
    if kind == "gaussian std 0.5":
        generator = torch.Generator().manual_seed(seed)
        return 0.5 * torch.randn(n_examples, 1, length, generator=generator).expand(-1, n_sources, -1)
    raise ValueError(f"unknown input kind {kind!r}; choose from {list(INPUT_KINDS)}")


def example_noise(indices, shape, seed):
    """Standard normal noise [B, N, T], a function of (seed, example index) only."""
    noise = [
        torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i))) for i in indices
    ]
    return torch.stack(noise)


class CrossLikelihoodModule(pl.LightningModule):
    """``priors[a]`` is the family fine-tuned at ``sigmas_model[a]`` (0 = noiseless). Table 1 scores the
    synthetic inputs under the noiseless model and the one at ``table_sigma`` (paper 003: 0.359), or the
    largest sigma when that level is not among the models.

    ``likelihood_method`` (a string, or None) is copied into the results so every table can say how its
    log-likelihoods were computed. ``denoising_sigmas`` (or None) asks for the denoising-loss matrix, from
    the noiseless model's ``denoising_losses`` on clean test data."""

    def __init__(self, priors, sigmas_model, sources, sigmas_data=(), inputs=INPUT_KINDS,
                 n_input_examples=4, input_length=16384, latent_only=False, noise_seed=0, table_sigma=None,
                 likelihood_method=None, denoising_sigmas=None, pooled_priors=None, sample_rate=None,
                 coder_bit_depth=16):
        super().__init__()
        if len(priors) != len(sigmas_model):
            raise ValueError("one sigma_model per prior family is needed")
        pooled_priors = list(pooled_priors) if pooled_priors is not None else [None] * len(priors)
        if len(pooled_priors) != len(priors):
            raise ValueError("one pooled prior (or None) per sigma_model is needed")
        self.priors = nn.ModuleList(priors)
        # ModuleList takes no None: the missing levels are remembered by position.
        self.pooled_levels = [a for a, p in enumerate(pooled_priors) if p is not None]
        self.pooled = nn.ModuleList([p for p in pooled_priors if p is not None])
        self.sample_rate, self.coder_bit_depth = sample_rate, check_bit_depth(coder_bit_depth)
        discrete = any(getattr(p, "discrete_likelihood", False) for p in priors)
        self.complexity_unavailable = DISCRETE_COMPLEXITY if discrete else None
        self.coded = sample_rate is not None and not discrete  # coder lengths serve the complexity score only
        self.crop_parts = []
        self.sigmas_model = [float(s) for s in sigmas_model]
        self.sigmas_data = [float(s) for s in sigmas_data]
        self.sources = list(sources)
        self.inputs = list(inputs)
        self.n_input_examples, self.input_length = n_input_examples, input_length
        self.latent_only, self.noise_seed = latent_only, noise_seed
        self.table_sigma = table_sigma
        n_models, n_sources = len(priors), len(sources)
        self.register_buffer("matrix_sums", torch.zeros(n_models, n_sources, n_sources, dtype=torch.float64))
        self.register_buffer("grid_sums", torch.zeros(n_models, len(self.sigmas_data), n_sources, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.likelihood_method = likelihood_method
        self.denoising_sigmas = None if denoising_sigmas is None else [float(s) for s in denoising_sigmas]
        if self.denoising_sigmas is not None:
            if not hasattr(self.denoising_prior, "denoising_losses"):
                raise ValueError(f"denoising_sigmas needs priors with denoising_losses; "
                                 f"{type(self.denoising_prior).__name__} has none")
            self.register_buffer("denoising_sums", torch.zeros(len(self.denoising_sigmas), n_sources, n_sources,
                                                               dtype=torch.float64))
        self.results = None

    @property
    def denoising_prior(self):
        """The noiseless model (every level of a noise-conditional family shares its denoiser)."""
        return self.priors[self.sigmas_model.index(min(self.sigmas_model))]

    def denoising_rows(self, x, indices):
        """[S, N(data k), N(prior j)] summed over the batch: one call per example, all k and j at once, with
        noise seeded by (noise_seed, example index) only."""
        n_sources = x.shape[1]
        sums = x.new_zeros(len(self.denoising_sigmas), n_sources, n_sources, dtype=torch.float64)
        for example, index in zip(x, indices):
            # Row k of the call is source k fed to every prior j.
            as_every_source = example.unsqueeze(1).expand(-1, n_sources, -1)
            seed = self.noise_seed * 1_000_003 + int(index)
            sums += self.denoising_prior.denoising_losses(as_every_source, self.denoising_sigmas, seed=seed).double()
        return sums

    def log_prob(self, prior, x):
        kwargs = {"latent_only": True} if self.latent_only else {}
        return prior.log_prob(x, **kwargs).double()

    def on_test_epoch_start(self):
        for buffer in (self.matrix_sums, self.grid_sums, self.count):
            buffer.zero_()
        if self.denoising_sigmas is not None:
            self.denoising_sums.zero_()
        self.crop_parts = []

    def pooled_prior(self, a):
        return self.pooled[self.pooled_levels.index(a)] if a in self.pooled_levels else None

    def crop_values(self, a, noisy):
        """[B, N] pooled-prior log-likelihoods (nan without a pooled prior) and coder lengths (nan without a
        sample rate) of each source's crop under model a."""
        batch_size, n_sources, length = noisy.shape
        pooled, lengths = [torch.full((batch_size, n_sources), math.nan, dtype=torch.float64) for _ in range(2)]
        if self.pooled_prior(a) is not None:
            # Every source's crop is one example of the one-source pooled prior.
            crops = noisy.reshape(batch_size * n_sources, 1, length)
            pooled = self.log_prob(self.pooled_prior(a), crops).view(batch_size, n_sources).cpu()
        if self.coded:
            lengths = coder_length(noisy, self.sample_rate, self.coder_bit_depth)
        return pooled, lengths

    def test_step(self, batch, batch_idx):
        x = batch["sources"]
        batch_size, n_sources, _ = x.shape
        noise = example_noise(batch["index"].tolist(), x.shape[1:], self.noise_seed).to(x)
        crops = {"index": batch["index"].cpu().long(), "loglik": [], "pooled": [], "coder_length": []}
        for a, (prior, sigma_model) in enumerate(zip(self.priors, self.sigmas_model)):
            noisy = x + sigma_model * noise
            rows = []
            for k in range(n_sources):
                # Source k fed to every prior j at once: one grouped pass gives row k of M.
                as_every_source = noisy[:, k : k + 1].expand(-1, n_sources, -1)
                rows.append(self.log_prob(prior, as_every_source))
                self.matrix_sums[a, k] += rows[-1].sum(dim=0)
            crops["loglik"].append(torch.stack(rows, dim=1).cpu())  # [B, N(data k), N(prior j)]
            pooled, lengths = self.crop_values(a, noisy)
            crops["pooled"].append(pooled)
            crops["coder_length"].append(lengths)
            for b, sigma_data in enumerate(self.sigmas_data):
                self.grid_sums[a, b] += self.log_prob(prior, x + sigma_data * noise).sum(dim=0)
        if self.denoising_sigmas is not None:
            self.denoising_sums += self.denoising_rows(x, batch["index"].tolist())
        self.count += batch_size
        # [A, B, ...] per batch; gathered and ordered by index at the end of the epoch.
        self.crop_parts.append({key: value if key == "index" else torch.stack(value)
                                for key, value in crops.items()})

    def per_crop(self):
        """Every rank's per-crop values, ordered by example index (so independent of the sharding)."""
        parts = self.crop_parts
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, parts)
            parts = [part for rank_parts in gathered for part in rank_parts]
        index = torch.cat([part["index"] for part in parts])
        order = torch.argsort(index)
        values = {key: torch.cat([part[key] for part in parts], dim=1)[:, order]
                  for key in ("loglik", "pooled", "coder_length")}
        pooled = [values["pooled"][a].tolist() if a in self.pooled_levels else None
                  for a in range(len(self.sigmas_model))]
        return {
            "index": index[order].tolist(),
            "sigma_model": self.sigmas_model,
            "loglik": values["loglik"].tolist(),  # [A][crop][data k][prior j]
            "pooled": pooled,  # [A][crop][data k], None where no pooled prior at that level
            "coder_length": values["coder_length"].tolist() if self.coded else None,
            "coder": describe(self.sample_rate, self.coder_bit_depth) if self.coded else None,
            "complexity_unavailable": self.complexity_unavailable,
        }

    def on_test_epoch_end(self):
        reduce = self.trainer.strategy.reduce
        matrix_sums = reduce(self.matrix_sums.clone(), reduce_op="sum")
        grid_sums = reduce(self.grid_sums.clone(), reduce_op="sum")
        count = reduce(self.count.clone(), reduce_op="sum")
        if count == 0:
            raise RuntimeError("the cross-likelihood test set is empty")
        matrices = (matrix_sums / count).tolist()
        self.results = {
            "sources": self.sources,
            "latent_only": self.latent_only,
            "count": int(count.item()),
            "matrices": [
                {"sigma_model": s, "sigma_data": s, "loglik": matrices[a], "count": int(count.item())}
                for a, s in enumerate(self.sigmas_model)
            ],
            "noise_grid": {
                "sigma_model": self.sigmas_model,
                "sigma_data": self.sigmas_data,
                "loglik": (grid_sums / count).tolist(),
            } if self.sigmas_data else None,
            "inputs_table": self.inputs_table(),
            "inputs_table_sigmas": self.inputs_table_sigmas() if self.inputs else None,
            "likelihood_method": self.likelihood_method,
            "per_crop": self.per_crop(),
        }
        if self.denoising_sigmas is not None:
            denoising_sums = reduce(self.denoising_sums.clone(), reduce_op="sum")
            self.results["denoising_loss"] = {
                "sigmas": self.denoising_sigmas, "mse": (denoising_sums / count).tolist(),
                "label": DENOISING_LABEL, "count": int(count.item()),
            }
        for a, s in enumerate(self.sigmas_model):
            diagonal = torch.diagonal(matrix_sums[a] / count)
            self.log(f"cross_likelihood/diagonal_mean_sigma_{s:g}", diagonal.mean().float(), rank_zero_only=True)

    def inputs_table_sigmas(self):
        """{"noiseless", "wide"}: the sigma_model levels of Table 1, and the "requested" wide level."""
        wide = max(self.sigmas_model)
        if self.table_sigma is not None:
            # Model sigmas are rounded to three significant digits (run_layout.canonical_sigma).
            wide = next((s for s in self.sigmas_model if math.isclose(s, self.table_sigma, rel_tol=1e-3)), wide)
        return {"noiseless": min(self.sigmas_model), "wide": wide, "requested": self.table_sigma}

    @torch.no_grad()
    def inputs_table(self):
        """Table 1 under the noiseless and the wide model (deterministic, so every rank agrees)."""
        if not self.inputs:
            return []
        levels = self.inputs_table_sigmas()
        chosen = sorted({self.sigmas_model.index(levels["noiseless"]), self.sigmas_model.index(levels["wide"])})
        rows = []
        for kind in self.inputs:
            x = synthetic_input(kind, self.n_input_examples, len(self.sources), self.input_length, self.noise_seed)
            for a in chosen:
                loglik = self.log_prob(self.priors[a], x.to(self.device)).mean(dim=0)
                row = {"input": kind, "sigma_model": self.sigmas_model[a], "loglik": loglik.tolist()}
                # The same input in every channel: the pooled prior and the coder see its first.
                pooled, lengths = self.crop_values(a, x[:, :1].to(self.device))
                row["pooled"] = float(pooled.mean()) if self.pooled_prior(a) is not None else None
                row["coder_length"] = float(lengths.mean()) if self.coded else None
                rows.append(row)
        return rows
