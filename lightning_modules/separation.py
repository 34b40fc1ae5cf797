"""Separation of a datamodule's test mixtures as a trainer ``test`` loop, with any sampler.

The sampler (``LangevinSeparator``: BASIS, SGLD; ``DiffusionSeparator``) is duck-typed: it has ``alpha``
[N], ``n_steps``, ``trace_sigmas`` (the sigma of each trace entry), ``nonfinite_steps`` and
``forward(mix [B, T], n_chains, seeds) -> (x [B, C, N, T], {"loglik", "mix_error"} each [B, n_steps])``.

Each mixture is separated by ``n_chains`` parallel chains and scored against its references with the
baselines beside it, one row per (mixture, method):

* ``average``: every source = m (1/N) / alpha_k (paper 004 section 5);
* ``<algorithm>``: one posterior sample (chain 0);
* ``<algorithm>_selected_of_C``: the chain the selection prior likes best (paper 004's "10x": the
  samples meet the mixture, so p(x | m) is proportional to p(x)), by its ``selection_score`` when it has
  one (a score network's denoising score: its exact likelihood is an ODE solve), else its ``log_prob``;
* ``<algorithm>_oracle_of_C``: the chain with the best mean SI-SDR (needs the references; an upper bound);
* ``<algorithm>_consensus_of_C``: the chain with the best mean SI-SDR against the other chains (the
  minimum-Bayes-risk choice: no prior, no reference);
* ``<algorithm>_<name>_of_C`` for each of the sampler's own ``extra_choice_names`` (its
  ``extra_choices(mix, estimates) -> {name: [B] chain}``; the latent separator's time-domain consistency);
* ``<algorithm>_<name>`` for each of the sampler's ``point_estimate_names``: an estimate that is no chain
  (``trace["point_estimates"] = {name: [B, N, T]}``; the variational posterior's mean);
* ``<algorithm>_posterior_wiener_of_C`` with ``wiener_fft`` and C > 1: the mixture shared by each source's
  power averaged over all C chains (samplers/wiener_filter.py), an estimate of the posterior mean that no
  chain is.

``mixture_consistency`` projects every estimate onto the mixture before it is scored (the nearest sources,
in L2, whose weighted sum is m; samplers/mixture_projection.py), and ``wiener_fft`` first refilters it from the
mixture's STFT (samplers/wiener_filter.py); the chains are still ranked on the sampler's own estimates, so a
choice by the mix error (``consistent``) keeps its meaning.

Every row has SI-SDR, SI-SDRi and (``museval``) BSSEval v4 SDR of the whole item; ``protocol="windowed"``
adds the windowed SI-SDRi of recent generative separators (``si_sdri_windowed*``, ``windows_kept``), whose
summary is a mean over all kept windows of all mixtures.

Rows of every rank are gathered, so the result covers each test mixture once whatever the sharding;
the sampler's noise is seeded per mixture index, so it does not depend on the sharding either.
"""
import math
import time

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from lightning_modules.metrics.separation_metrics import average_baseline, bss_sdr, si_sdr, si_sdr_of_mix, windowed_si_sdri
from lightning_modules.samplers.mixture_projection import project_to_mixture
from lightning_modules.samplers.wiener_filter import check_window, posterior_wiener, wiener_filter

SEED_STRIDE = 1_000_003
PROTOCOLS = ("full", "windowed")


class SeparationModule(pl.LightningModule):
    def __init__(self, separator, sources, algorithm="basis", n_chains=1, selection_prior=None, seed=0,
                 sample_rate=16000, museval=True, protocol="full", window=None, hop=None,
                 silence_threshold=1.5e-5, mixing=None, mixture_consistency=False, wiener_fft=0):
        super().__init__()
        if n_chains < 1:
            raise ValueError(f"n_chains must be >= 1, got {n_chains}")
        self.separator = separator
        self.selection_prior = selection_prior if selection_prior is not None else separator.score_model
        self.sources, self.algorithm, self.n_chains = list(sources), algorithm, n_chains
        self.seed, self.sample_rate, self.museval = seed, sample_rate, museval
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown separation.protocol {protocol!r}; choose from {list(PROTOCOLS)}")
        if protocol == "windowed" and not (window and hop and window > 0 and hop > 0):
            raise ValueError(f"the windowed protocol needs a positive window and hop, got {window} and {hop}")
        self.protocol, self.window, self.hop, self.silence_threshold = protocol, window, hop, silence_threshold
        self.mixing = mixing  # how the mix was resolved, for the record
        self.mixture_consistency = bool(mixture_consistency)
        check_window(wiener_fft)
        self.wiener_fft = int(wiener_fft)
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        steps = separator.n_steps
        self.register_buffer("trace_loglik", torch.zeros(steps, dtype=torch.float64))
        self.register_buffer("trace_mix_error", torch.zeros(steps, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("samples", torch.zeros((), dtype=torch.float64))  # mixture samples separated
        self.register_buffer("nonfinite_steps", torch.zeros((), dtype=torch.float64))
        self.register_buffer("relabelled_chains", torch.zeros((), dtype=torch.float64))  # diffusion relabelling
        self.register_buffer("pair_moves", torch.zeros((), dtype=torch.float64))  # diffusion pair refinement
        self.rows, self.results, self.started = [], None, None

    def method_names(self):
        names = ["average", self.algorithm]
        names += [f"{self.algorithm}_{name}" for name in getattr(self.separator, "point_estimate_names", ())]
        if self.n_chains > 1:
            names += [f"{self.algorithm}_selected_of_{self.n_chains}", f"{self.algorithm}_oracle_of_{self.n_chains}",
                      f"{self.algorithm}_consensus_of_{self.n_chains}"]
            names += [f"{self.algorithm}_{extra}_of_{self.n_chains}"
                      for extra in getattr(self.separator, "extra_choice_names", ())]
            if self.wiener_fft:
                names.append(self.posterior_wiener_name())
        return names

    def posterior_wiener_name(self):
        return f"{self.algorithm}_posterior_wiener_of_{self.n_chains}"

    def on_test_epoch_start(self):
        for buffer in (self.trace_loglik, self.trace_mix_error, self.count, self.samples, self.nonfinite_steps,
                       self.relabelled_chains, self.pair_moves):
            buffer.zero_()
        self.rows, self.started = [], time.time()

    def test_step(self, batch, batch_idx):
        mix, references, indices = batch["mix"].float(), batch["sources"].float(), batch["index"]
        seeds = [self.seed * SEED_STRIDE + int(i) for i in indices]
        with torch.inference_mode(False), torch.enable_grad():
            estimates, trace = self.separator(mix.clone(), self.n_chains, seeds)  # [B, C, N, T]
        points = {f"{self.algorithm}_{name}": estimate for name, estimate in trace.get("point_estimates", {}).items()}
        self.trace_loglik += trace["loglik"].double().sum(dim=0)
        self.trace_mix_error += trace["mix_error"].double().sum(dim=0)
        self.count += mix.shape[0]
        self.samples += mix.numel()
        self.nonfinite_steps += self.separator.nonfinite_steps
        self.relabelled_chains += getattr(self.separator, "relabelled_chains", 0)
        self.pair_moves += getattr(self.separator, "pair_moves", 0)
        with torch.autocast(self.device.type, enabled=False), torch.no_grad():
            batch_size, n_chains, n_sources, length = estimates.shape
            selection = selection_scores(self.selection_prior, estimates.flatten(0, 1)).view(batch_size, n_chains, -1)
            extras = {}
            if self.n_chains > 1 and hasattr(self.separator, "extra_choices"):
                extras = self.separator.extra_choices(mix, estimates)
            options = (self.separator.alpha, self.wiener_fft, self.mixture_consistency)
            combined = {}
            if self.wiener_fft and self.n_chains > 1:  # from the chains as sampled; it mixes back exactly already
                combined[self.posterior_wiener_name()] = posterior_wiener(mix, estimates, self.separator.alpha,
                                                                          self.wiener_fft)
            estimates = post_filter(mix.unsqueeze(1), estimates, *options)
            points = {name: post_filter(mix, point, *options) for name, point in points.items()} | combined
            chain_scores = si_sdr(estimates, references.unsqueeze(1))  # [B, C, N]
            chosen = self.choose(selection.mean(dim=2), chain_scores, estimates)
            chosen.update({f"{self.algorithm}_{name}_of_{self.n_chains}": chain for name, chain in extras.items()})
            rows = self.score(mix, references, indices, estimates, chosen, selection, chain_scores, points)
        self.rows.extend(rows)
        picked = {"average": average_baseline(mix, self.separator.alpha), **points}
        picked.update({name: estimates[torch.arange(batch_size), chain] for name, chain in chosen.items()})
        return {"index": indices, "mix": mix, "references": references, "estimates": picked}

    def choose(self, selection, chain_scores, estimates):
        """Which chain each method takes, per mixture: {method: [B] chain indices}."""
        chosen = {self.algorithm: torch.zeros(selection.shape[0], dtype=torch.long, device=selection.device)}
        if self.n_chains > 1:
            chosen[f"{self.algorithm}_selected_of_{self.n_chains}"] = selection.nan_to_num(nan=-torch.inf).argmax(dim=1)
            chosen[f"{self.algorithm}_oracle_of_{self.n_chains}"] = chain_scores.mean(dim=2).argmax(dim=1)
            chosen[f"{self.algorithm}_consensus_of_{self.n_chains}"] = consensus_choice(estimates)
        return chosen

    def score(self, mix, references, indices, estimates, chosen, selection, chain_scores, points=None):
        alpha = self.separator.alpha
        mix_scores = si_sdr_of_mix(mix, references)  # [B, N]
        rows = []
        for b, index in enumerate(indices.tolist()):
            candidates = {"average": (average_baseline(mix[b], alpha), None)}
            candidates.update({name: (estimate[b], None) for name, estimate in (points or {}).items()})
            candidates.update({name: (estimates[b, chain[b]], int(chain[b])) for name, chain in chosen.items()})
            for name, (estimate, chain) in candidates.items():
                scores = si_sdr(estimate, references[b]) if chain is None else chain_scores[b, chain]
                row = {"index": index, "method": name, "chain": chain}
                residual = mix[b] - (alpha.unsqueeze(-1) * estimate).sum(dim=0)
                row["mix_error"] = float(residual.double().pow(2).mean())
                row["selection_score"] = float(selection[b, chain].mean()) if chain is not None else None
                self.add_scores(row, "si_sdr", scores)
                self.add_scores(row, "si_sdri", scores - mix_scores[b])
                if self.museval:
                    self.add_scores(row, "sdr", bss_sdr(estimate, references[b], self.sample_rate))
                if self.protocol == "windowed":
                    windowed, row["windows_kept"], row["windows"] = windowed_si_sdri(
                        estimate, references[b], mix[b], self.window, self.hop, self.silence_threshold)
                    self.add_scores(row, "si_sdri_windowed", windowed)
                rows.append(row)
        return rows

    def add_scores(self, row, metric, values):
        values = [float(v) for v in values]
        for name, value in zip(self.sources, values):
            row[f"{metric}_{name}"] = value
        row[metric] = sum(values) / len(values)

    def on_test_epoch_end(self):
        reduce = self.trainer.strategy.reduce
        count = reduce(self.count.clone(), reduce_op="sum")
        if count == 0:
            raise RuntimeError("the separation test set is empty")
        trace = {
            "loglik": (reduce(self.trace_loglik.clone(), reduce_op="sum") / count).tolist(),
            "mix_error": (reduce(self.trace_mix_error.clone(), reduce_op="sum") / count).tolist(),
            "step_sigmas": [float(sigma) for sigma in self.separator.trace_sigmas],
        }
        levels = getattr(self.separator, "levels", None)
        if levels is not None:
            trace["level_sigmas"] = [level.sigma for level in levels]
            trace["steps_per_level"] = [level.steps for level in levels]
        seconds = time.time() - self.started
        audio_seconds = float(reduce(self.samples.clone(), reduce_op="sum")) / self.sample_rate
        nonfinite = int(reduce(self.nonfinite_steps.clone(), reduce_op="sum").item())
        rows = self.rows
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        order = {name: i for i, name in enumerate(self.method_names())}
        rows = sorted(rows, key=lambda row: (row["index"], order[row["method"]]))
        self.results = {
            "algorithm": self.algorithm, "sources": self.sources, "n_chains": self.n_chains,
            "count": int(count.item()), "seconds": seconds, "seconds_per_audio_second": seconds / audio_seconds,
            "selection": selection_kind(self.selection_prior), "mixing": self.mixing, "protocol": self.protocol,
            **({"window": self.window, "hop": self.hop} if self.protocol == "windowed" else {}),
            "nonfinite_prior_gradients": nonfinite,
            "relabelled_chains": int(reduce(self.relabelled_chains.clone(), reduce_op="sum").item()),
            "pair_moves_accepted": int(reduce(self.pair_moves.clone(), reduce_op="sum").item()),
            "summary": summarize(rows, self.method_names()),
            "rows": rows, "trace": trace,
        }
        for name, stats in self.results["summary"].items():
            for metric in ("si_sdr", "si_sdri", "sdr", "si_sdri_windowed"):
                if metric in stats:
                    self.log(f"separation/{name}/{metric}", stats[metric], rank_zero_only=True)


def consensus_choice(estimates):
    """[B, C, N, T] -> [B]: the chain whose sources score best, in mean SI-SDR, against every other chain's. The
    minimum-Bayes-risk choice with the chains as samples of the posterior: it needs no prior and no reference."""
    n_chains = estimates.shape[1]
    total = torch.zeros(estimates.shape[:2], dtype=torch.float64, device=estimates.device)
    for other in range(n_chains):  # one reference chain at a time: C x C pairs of whole estimates would not fit
        scores = si_sdr(estimates, estimates[:, other:other + 1]).mean(dim=2)  # [B, C]
        scores = scores.nan_to_num(nan=-100.0, posinf=100.0, neginf=-100.0).clamp(-100.0, 100.0)
        scores[:, other] = 0.0  # a chain against itself says nothing
        total += scores
    return total.argmax(dim=1)


def post_filter(mix, estimates, alpha, wiener_fft=0, mixture_consistency=False):
    """Finished estimates [..., N, T] of mix [..., T] as they are scored and written: Wiener-refiltered from the
    mixture (wiener_fft > 0), then projected onto it (mixture_consistency), as asked."""
    if wiener_fft:
        estimates = wiener_filter(mix, estimates, alpha, wiener_fft)
    if mixture_consistency:
        estimates = project_to_mixture(mix, estimates, alpha)
    return estimates


def selection_kind(prior):
    label = getattr(prior, "selection_label", None)
    if label:
        return label
    return "denoising score" if getattr(prior, "selection_score", None) is not None else "log_prob"


def selection_scores(prior, x):
    """How much the selection prior likes each source of each sample x [M, N, T]: [M, N], higher is better."""
    select = getattr(prior, "selection_score", None)
    return (select(x) if select is not None else prior.log_prob(x)).float()


def summarize(rows, methods):
    """Mean of every metric column, per method. The windowed SI-SDRi is a mean over every kept window, so
    a mixture counts with its number of kept windows (one with none counts for nothing)."""
    summary = {}
    for name in methods:
        selected = [row for row in rows if row["method"] == name]
        stats = {"count": len(selected)}
        for key in selected[0] if selected else ():
            if key.startswith("si_sdri_windowed"):
                kept = sum(row["windows_kept"] for row in selected)
                weighted = sum(row[key] * row["windows_kept"] for row in selected if row["windows_kept"])
                stats[key] = weighted / kept if kept else math.nan
            elif key in ("windows_kept", "windows"):
                stats[key] = sum(row[key] for row in selected)
            elif key.startswith(("si_sdr", "sdr", "mix_error")):
                stats[key] = sum(row[key] for row in selected) / len(selected)
        summary[name] = stats
    return summary
