"""Stage 1 of the LQ-VAE family: trains the shared LQ-VAE (lightning_modules/nn/lqvae.py) on single-source
crops of every source, with the linearisation loss on groups of L = model.lin_sources crops from different
sources (default: every source of the run, so the loss sees the mixtures the separator will see).

A batch ``sources`` [B, N, T] gives B * N single-source crops. Pairs (L = 2, paper 002): crop (b, k) with
(b, k + 1 mod N), the next source of the same example. L < N: the group of (b, k) is sources k, ..., k + L - 1
(mod N) of example b, B * N groups. L = N: one group per example, the mixture of all its sources (the N
rotations would be the same mixture N times). Its test loop is the stage-1 report: reconstruction SI-SDR per
source class, code usage (perplexity, dead codes) per class and overall, and the held-out linearisation
error of the group starting at each source, from sums reduced over DDP ranks.
"""
import logging
import math

import pytorch_lightning as pl
import torch

from lightning_modules.nn.latent_prior import LatentPriorConfig, lqvae_config
from lightning_modules.nn.lqvae import LQVAE
from lightning_modules.nn.vector_quantizer import perplexity
from lightning_modules.prior_module import restore_rng_states, save_rng_states
from lightning_modules.prior_registry import resolve_model_config
from lightning_modules.metrics.separation_metrics import si_sdr

log = logging.getLogger(__name__)


def build_lqvae(model: dict):
    options = resolve_model_config(model)
    if options.pop("name") != "lqvae":
        raise ValueError(f"the LQ-VAE stage needs model.name=lqvae, got {model.get('name')!r}")
    return LQVAE(lqvae_config(LatentPriorConfig(**options)))


def pairs(x):
    """[B, N, T] -> (crops [B*N, T], partner [B*N]: the index of the same example's next source)."""
    batch, n, length = x.shape
    if n < 2:
        raise ValueError("the linearisation loss needs crops of at least two sources (data.sources)")
    index = torch.arange(batch * n, device=x.device).view(batch, n)
    return x.reshape(batch * n, length), index.roll(-1, dims=1).reshape(-1)


def resolve_lin_sources(value, n_sources):
    """model.lin_sources resolved against the run's N sources: None = N; refused outside 2..N."""
    size = n_sources if value is None else int(value)
    if not 2 <= size <= n_sources:
        raise ValueError(f"model.lin_sources must be between 2 and the number of sources in data.sources "
                         f"({n_sources}), got {size}")
    return size


def lin_groups(x, size, distinct=True):
    """[B, N, T] -> (crops [B*N, T], partner): ``pairs`` for size 2 (paper 002's, unchanged); else groups
    [G, size] of crop indices, sources k, ..., k + size - 1 (mod N) of one example. ``distinct`` with
    size == N: one group per example, not its N rotations (the same mixture, summed in another order)."""
    if size == 2:
        return pairs(x)
    batch, n, length = x.shape
    index = torch.arange(batch * n, device=x.device).view(batch, n)
    if distinct and size == n:
        return x.reshape(batch * n, length), index
    groups = torch.stack([index.roll(-j, dims=1) for j in range(size)], dim=-1)  # [B, N, size]
    return x.reshape(batch * n, length), groups.reshape(batch * n, size)


def lin_labels(sources, size):
    """The group starting at each source, named by its members: 'sine+square' for a pair."""
    n = len(sources)
    return ["+".join(sources[(k + j) % n] for j in range(size)) for k in range(n)]


class LQVAEModule(pl.LightningModule):
    def __init__(self, model: dict, sources: list, lr: float = 3e-4, lr_decay: float = 0.6,
                 lr_decay_times: int = 0, schedule_steps: int = 100_000, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.sources = list(sources)
        self.lqvae = build_lqvae(model)
        self.lin_sources = resolve_lin_sources(self.lqvae.cfg.lin_sources, len(self.sources))
        self.skip_step = False
        self.skipped_steps = 0
        self.results = None

    def logged_terms(self):
        spectral = ("spectral",) if self.lqvae.cfg.spectral_weight > 0 else ()
        return ("loss", "mse", *spectral, "commit", "lin")

    def training_step(self, batch, batch_idx):
        x, partner = lin_groups(batch["sources"].float(), self.lin_sources)
        terms = self.lqvae.losses(x, partner, update=True)
        finite = torch.isfinite(terms["loss"]).reshape(1).float()
        if self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce(finite, reduce_op="min")
        self.skip_step = not bool(finite)
        if self.skip_step:
            self.skipped_steps += 1
            log.warning("non-finite LQ-VAE loss at step %d: skipping the update", self.global_step)
            return terms["loss"].nan_to_num(0.0, 0.0, 0.0) * 0.0
        for name in self.logged_terms():
            self.log(f"train/{name}", terms[name], prog_bar=name in ("loss", "lin"))
        counts = torch.bincount(terms["indices"].flatten(), minlength=self.lqvae.cfg.codebook_size)
        self.log("train/perplexity", perplexity(counts).float())
        self.log("train/dead_codes", float(self.lqvae.quantizer.dead_codes()))
        return terms["loss"]

    def on_before_optimizer_step(self, optimizer):
        if self.skip_step or not all(torch.isfinite(p.grad).all() for p in self.parameters() if p.grad is not None):
            optimizer.zero_grad(set_to_none=True)  # Adam leaves parameters without gradients untouched

    def validation_step(self, batch, batch_idx):
        x, partner = lin_groups(batch["sources"].float(), self.lin_sources)
        terms = self.lqvae.losses(x, partner, update=False)
        size = batch["sources"].shape[0]
        for name in self.logged_terms():
            self.log(f"val/{name}", terms[name], sync_dist=True, batch_size=size, prog_bar=name == "loss")
        self.log("val/si_sdr", si_sdr(terms["reconstruction"], x).mean().float(), sync_dist=True, batch_size=size)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        times, total = self.hparams.lr_decay_times, self.hparams.schedule_steps
        milestones = [round(total * i / (times + 1)) for i in range(1, times + 1)]
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=self.hparams.lr_decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        save_rng_states(checkpoint)  # code restarts draw from the global generator
        checkpoint["skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint):
        restore_rng_states(checkpoint)
        self.skipped_steps = int(checkpoint.get("skipped_steps", 0))

    # The stage-1 report, as a test loop.
    def on_test_epoch_start(self):
        n, k = len(self.sources), self.lqvae.cfg.codebook_size
        self.sums = {
            "si_sdr": torch.zeros(n, dtype=torch.float64, device=self.device),
            "code_counts": torch.zeros(n, k, dtype=torch.float64, device=self.device),
            "lin_error": torch.zeros(n, dtype=torch.float64, device=self.device),
            "lin_energy": torch.zeros(n, dtype=torch.float64, device=self.device),
            "lin_agreement": torch.zeros(n, dtype=torch.float64, device=self.device),
            "count": torch.zeros(n, dtype=torch.float64, device=self.device),
        }

    @torch.no_grad()
    def test_step(self, batch, batch_idx):
        sources = batch["sources"].float()
        batch_size, n, length = sources.shape
        # One group per source (its rotations when L = N), so each row of the report has its own.
        x, partner = lin_groups(sources, self.lin_sources, distinct=False)
        quantised, indices, _ = self.lqvae.quantizer(self.lqvae.encode(x))
        reconstruction = self.lqvae.decode(quantised)
        per_crop = si_sdr(reconstruction, x).view(batch_size, n)
        ql, lq, ql_indices, lq_indices = self.lqvae.linearisation(x, partner, quantised)
        sums = self.sums
        sums["si_sdr"] += per_crop.sum(0)
        indices = indices.view(batch_size, n, -1)
        for k in range(n):
            sums["code_counts"][k] += torch.bincount(indices[:, k].flatten(), minlength=self.lqvae.cfg.codebook_size)
        # The group (k, ..., k + L - 1) is reported under source k.
        sums["lin_error"] += (lq - ql).pow(2).mean(dim=(1, 2)).view(batch_size, n).sum(0)
        sums["lin_energy"] += lq.pow(2).mean(dim=(1, 2)).view(batch_size, n).sum(0)
        sums["lin_agreement"] += (ql_indices == lq_indices).double().mean(1).view(batch_size, n).sum(0)
        sums["count"] += batch_size

    def on_test_epoch_end(self):
        sums = {key: self.trainer.strategy.reduce(value.clone(), reduce_op="sum") for key, value in self.sums.items()}
        count = sums["count"]
        if float(count.min()) == 0:
            raise RuntimeError("the LQ-VAE report's test set is empty")
        counts = sums["code_counts"]
        total_counts = counts.sum(0)
        cfg = self.lqvae.cfg
        self.results = {
            "sources": self.sources,
            "count": int(count[0]),
            "hop": cfg.hop,
            "codebook_size": cfg.codebook_size,
            "lin_weight": cfg.lin_weight,
            "lin_mixing": cfg.lin_mixing,
            "lin_sources": self.lin_sources,
            "si_sdr": dict(zip(self.sources, (sums["si_sdr"] / count).tolist())),
            "perplexity": dict(zip(self.sources, perplexity(counts).tolist())),
            "codes_used": dict(zip(self.sources, (counts > 0).sum(1).tolist())),
            "perplexity_all": float(perplexity(total_counts)),
            "codes_used_all": int((total_counts > 0).sum()),
            "dead_codes_all": int((total_counts == 0).sum()),
            "dead_codes_ema": self.lqvae.quantizer.dead_codes(),
            "lin_pairs": lin_labels(self.sources, self.lin_sources),  # the groups (pairs when L = 2)
            "lin_error": dict(zip(self.sources, (sums["lin_error"] / count).tolist())),
            "lin_error_relative": dict(zip(self.sources, (sums["lin_error"] / sums["lin_energy"]).tolist())),
            "lin_code_agreement": dict(zip(self.sources, (sums["lin_agreement"] / count).tolist())),
        }
        for key in ("lin_error", "lin_error_relative", "lin_code_agreement", "si_sdr"):
            values = list(self.results[key].values())
            self.results[f"{key}_mean"] = float(sum(values) / len(values)) if all(map(math.isfinite, values)) else math.nan
        self.log("lqvae/si_sdr_min", float(min(self.results["si_sdr"].values())), rank_zero_only=True)
        self.log("lqvae/perplexity", self.results["perplexity_all"], rank_zero_only=True)
        self.log("lqvae/lin_error", self.results["lin_error_mean"], rank_zero_only=True)
