"""Thin Lightning wrapper that trains a prior family by maximum likelihood, optionally on noisy data.

It keeps the prior contract for the rest of the framework: ``log_prob(x: [B, N, T]) -> [B, N]`` (full
log-likelihood in nats per audio sample) and ``noise_sigma`` (the sigma of the Gaussian noise the
priors were trained or fine-tuned on; 0 for noiseless).
"""
import logging
import math
import random

import pytorch_lightning as pl
import torch

from lightning_modules.prior_registry import build_prior

log = logging.getLogger(__name__)


class PriorModule(pl.LightningModule):
    def __init__(
        self,
        model: dict,
        sources: list,
        lr: float = 1e-4,
        lr_decay: float = 0.6,
        lr_decay_times: int = 5,
        schedule_steps: int = 150_000,
        noise_sigma: float = 0.0,
    ):
        super().__init__()
        if not (isinstance(noise_sigma, (int, float)) and math.isfinite(noise_sigma) and noise_sigma >= 0):
            raise ValueError(f"noise_sigma must be a finite number >= 0, got {noise_sigma!r}")
        self.save_hyperparameters()
        self.sources = list(sources)
        self.prior = build_prior(model, len(self.sources))
        self.skipped_steps = 0

    @property
    def noise_sigma(self) -> float:
        return float(self.hparams.noise_sigma)

    def log_prob(self, x, **kwargs):
        return self.prior.log_prob(x, **kwargs)

    def add_noise(self, x, generator=None):
        if self.noise_sigma == 0:
            return x
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + self.noise_sigma * noise

    def training_step(self, batch, batch_idx):
        log_prob = self.log_prob(self.add_noise(batch["sources"]))  # [B, N]
        # Sum over sources of each prior's mean NLL: each prior gets the gradient it would get alone.
        loss = -log_prob.mean(dim=0).sum()
        if not torch.isfinite(loss):
            self.skipped_steps += 1
            log.warning("non-finite loss at step %d: skipping the step", self.global_step)
            self.log("train/skipped_steps", float(self.skipped_steps))
            return None
        per_source = log_prob.detach().mean(dim=0)
        self.log("train/loglik", per_source.mean(), prog_bar=True)
        for name, value in zip(self.sources, per_source):
            self.log(f"train/loglik_{name}", value)
        return loss

    def on_before_optimizer_step(self, optimizer):
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads and not all(torch.isfinite(g).all() for g in grads):
            self.skipped_steps += 1
            log.warning("non-finite gradient at step %d: skipping the step", self.global_step)
            self.log("train/skipped_steps", float(self.skipped_steps))
            optimizer.zero_grad(set_to_none=True)  # Adam leaves parameters without grads untouched

    def validation_step(self, batch, batch_idx):
        # Fixed noise per batch so the early-stopping signal does not jitter between checks.
        generator = torch.Generator(device=batch["sources"].device).manual_seed(batch_idx)
        per_source = self.log_prob(self.add_noise(batch["sources"], generator)).mean(dim=0)
        batch_size = batch["sources"].shape[0]
        self.log("val/loglik", per_source.mean(), sync_dist=True, batch_size=batch_size, prog_bar=True)
        for name, value in zip(self.sources, per_source):
            self.log(f"val/loglik_{name}", value, sync_dist=True, batch_size=batch_size)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        times, total = self.hparams.lr_decay_times, self.hparams.schedule_steps
        # Paper 003: lr x0.6 in a fixed five-step schedule, here evenly spaced over the run.
        milestones = [round(total * i / (times + 1)) for i in range(1, times + 1)]
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=self.hparams.lr_decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        # Tensors and plain tuples only, so the checkpoint loads with weights_only=True.
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint):
        states = checkpoint.get("rng_states")
        if states:
            torch.set_rng_state(states["torch"])
            random.setstate(states["python"])
            if "cuda" in states and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states["cuda"])
