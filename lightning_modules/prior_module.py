"""Thin Lightning wrapper that trains a prior family by maximum likelihood, optionally on noisy data, or by
the family's own objective (``training_loss``: denoising score matching for the score priors).

It keeps the prior contract for the rest of the framework: ``log_prob(x: [B, N, T]) -> [B, N]`` (full
log-likelihood in nats per audio sample) and ``noise_sigma`` (the sigma of the Gaussian noise the
priors were trained or fine-tuned on; 0 for noiseless).

The N priors of a family share grouped parameters but must train exactly as they would alone, so
everything that couples them is done per prior (see ``per_prior``): the loss, the skip of a non-finite
step, and gradient clipping. fp16 mixed precision is refused for several priors (``check_precision``):
its one loss scaler would skip every prior's step when one overflows; bf16 mixed precision needs no scaler.
"""
import logging
import math
import random

import pytorch_lightning as pl
import torch

from lightning_modules.prior_registry import build_prior

log = logging.getLogger(__name__)


def per_prior(tensor, n_priors):
    """``[N, -1]`` view of a family parameter (or its gradient): row k belongs to prior k.

    Every family keeps each parameter's first dimension grouped by prior (grouped convolutions stack
    the N priors' filters along the output channels; ActNorm's are ``[N, C, 1]``)."""
    return tensor.view(n_priors, -1)


def check_precision(precision, n_priors):
    """Refuse fp16 mixed precision for a family of several priors. Its one loss scaler skips the whole
    optimizer step when any prior's scaled gradient overflows, so every prior would lose the step of the
    one that overflowed: the priors would be coupled again. bf16 needs no loss scaling."""
    if str(precision) in ("16", "16-mixed") and n_priors > 1:  # "16-true" has no scaler
        raise ValueError(
            f"trainer.precision={precision!r} (fp16) couples the {n_priors} priors: its single loss scaler skips "
            f"every prior's step when one overflows. Use bf16 mixed precision instead (PRESET=...,bf16, "
            f"trainer.precision=bf16-mixed)"
        )


def mix_seed(*parts):
    """One 63-bit seed from several integers (a fixed polynomial hash: stable across runs and ranks)."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part)) % (2**63 - 1)
    return seed


def any_rank(module, flags):
    """Element-wise OR of a bool tensor over DDP ranks (every rank must take the same decision)."""
    if module._trainer is not None and module.trainer.world_size > 1:
        flags = module.trainer.strategy.reduce(flags.float(), reduce_op="sum") > 0
    return flags


def save_rng_states(checkpoint):
    """So a resumed run draws what the uninterrupted one would have. Tensors and plain tuples only, so the
    checkpoint loads with weights_only=True."""
    checkpoint["rng_states"] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()


def restore_rng_states(checkpoint):
    states = checkpoint.get("rng_states")
    if states:
        torch.set_rng_state(states["torch"])
        random.setstate(states["python"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])


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
        seed: int = 0,
    ):
        super().__init__()
        if not (isinstance(noise_sigma, (int, float)) and math.isfinite(noise_sigma) and noise_sigma >= 0):
            raise ValueError(f"noise_sigma must be a finite number >= 0, got {noise_sigma!r}")
        self.save_hyperparameters()
        self.sources = list(sources)
        self.prior = build_prior(model, len(self.sources))
        # A family whose density depends on the noise it was fine-tuned at (the smoothed WaveNet) reads it here.
        self.prior.noise_sigma = float(noise_sigma)
        n = len(self.sources)
        # Frozen parts (the LQ-VAE under its Transformers) are shared, not trained, and not grouped.
        bad = [name for name, p in self.prior.named_parameters() if p.requires_grad and p.shape[0] % n]
        if bad:
            raise ValueError(f"parameters {bad} are not grouped by prior (first dimension not a multiple of {n})")
        if noise_sigma > 0 and getattr(self.prior, "noise_conditional", False):
            raise ValueError(
                f"model {model.get('name')!r} is noise-conditional (one network for every sigma): it needs no "
                f"noise fine-tuning; train it once (make train) and its score and likelihood serve every level"
            )
        self.skipped_per_prior = [0] * n
        self.loss_skip = None  # [N] bool: priors whose loss was non-finite on some rank in this step
        # What training minimises, as logged: "loglik" (maximised; its negative is the loss) or a loss name.
        self.metric = getattr(self.prior, "training_metric", "loglik")

    def setup(self, stage):
        if stage == "fit":
            check_precision(self.trainer.precision, len(self.sources))

    @property
    def noise_sigma(self) -> float:
        return float(self.hparams.noise_sigma)

    @property
    def skipped_steps(self) -> int:
        """How many (step, prior) updates were skipped for a non-finite loss or gradient."""
        return sum(self.skipped_per_prior)

    def log_prob(self, x, **kwargs):
        return self.prior.log_prob(x, **kwargs)

    def add_noise(self, x, generator=None):
        if self.noise_sigma == 0:
            return x
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x + self.noise_sigma * noise

    def training_generator(self, batch_idx):
        """Fresh noise every step and a different draw on every DDP rank; a function of (seed, rank,
        step, batch) only, so a resumed run draws exactly the noise the uninterrupted one would have."""
        seed = mix_seed(self.hparams.seed, self.global_rank, self.global_step, batch_idx)
        return torch.Generator(device=self.device).manual_seed(seed)

    def objective(self, x, generator):
        """Loss per example and prior [B, N]: the family's own training loss (denoising score matching for
        score priors), else the negative log-likelihood of x + N(0, noise_sigma^2)."""
        training_loss = getattr(self.prior, "training_loss", None)
        if training_loss is not None:
            return training_loss(x, generator)
        return -self.log_prob(self.add_noise(x, generator))

    def as_metric(self, loss):
        return -loss if self.metric == "loglik" else loss

    def on_train_start(self):
        """Families that scale by the data's statistics (score priors: sigma_data) measure them from the
        training data before the first step; a resumed run keeps what it measured."""
        set_sigma_data = getattr(self.prior, "set_sigma_data", None)
        if set_sigma_data is None or bool(self.prior.sigma_data_measured):
            return
        sums = torch.zeros(2, len(self.sources), dtype=torch.float64, device=self.device)
        for i, batch in enumerate(self.trainer.datamodule.train_dataloader()):
            if i == 8:
                break
            x = batch["sources"].to(self.device, torch.float64)  # [B, N, T]
            sums += torch.stack([x.pow(2).sum(dim=(0, 2)), torch.full_like(sums[0], x.shape[0] * x.shape[2])])
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        sigma_data = (sums[0] / sums[1]).sqrt()  # RMS about zero: the denoiser's D = c_skip x assumes zero mean
        set_sigma_data(sigma_data)
        log.info("sigma_data measured from the training data: %s",
                 dict(zip(self.sources, [round(v, 4) for v in sigma_data.tolist()])))

    def training_step(self, batch, batch_idx):
        # Sum over priors of each prior's mean loss: each prior gets the gradient it would get alone.
        per_prior_loss = self.objective(batch["sources"], self.training_generator(batch_idx)).float().mean(dim=0)
        skip = any_rank(self, ~torch.isfinite(per_prior_loss))
        self.loss_skip = skip if self.loss_skip is None else self.loss_skip | skip
        # A skipped prior contributes a zero that stays connected to the graph: returning None instead
        # would make Lightning raise under DDP. Its gradients are zeroed in on_before_optimizer_step.
        loss = torch.where(skip, torch.zeros_like(per_prior_loss), per_prior_loss).sum()
        kept = (~skip).float()
        per_source = self.as_metric(per_prior_loss.detach().nan_to_num(0.0)) * kept
        if bool(kept.any()):
            self.log(f"train/{self.metric}", per_source.sum() / kept.sum(), prog_bar=True)
        for k, name in enumerate(self.sources):
            if not skip[k]:
                self.log(f"train/{self.metric}_{name}", per_source[k])
        return loss

    def on_before_optimizer_step(self, optimizer):
        """Skip, per prior, an update whose loss or gradient is not finite (after the DDP all-reduce the
        gradients are equal on every rank, so every rank skips the same priors)."""
        n = len(self.sources)
        params = [p for p in self.parameters() if p.grad is not None]
        skip = torch.zeros(n, dtype=torch.bool, device=self.device)
        if self.loss_skip is not None:
            skip |= self.loss_skip.to(self.device)
        self.loss_skip = None
        for p in params:
            skip |= ~torch.isfinite(per_prior(p.grad, n)).all(dim=1)
        if not bool(skip.any()):
            return
        for k in torch.nonzero(skip).flatten().tolist():
            self.skipped_per_prior[k] += 1
            log.warning("non-finite loss or gradient of prior %r at step %d: skipping its update",
                        self.sources[k], self.global_step)
        if bool(skip.all()):
            optimizer.zero_grad(set_to_none=True)  # Adam leaves parameters without grads untouched
        else:
            # Zeroed, a prior's slice gets no gradient this step (Adam's running moments still decay).
            for p in params:
                per_prior(p.grad, n)[skip] = 0.0
        self.log("train/skipped_steps", float(self.skipped_steps))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Clip each prior's gradient by its own norm, as if it trained alone (not by the family's)."""
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm not in (None, "norm"):
            # Clipping by value acts on each element, which is already per prior.
            return self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        n = len(self.sources)
        grads = [per_prior(p.grad, n) for p in self.parameters() if p.grad is not None]
        if not grads:
            return
        norms = torch.stack([g.float().pow(2).sum(dim=1) for g in grads]).sum(dim=0).sqrt()  # [N]
        scale = (gradient_clip_val / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.to(g.dtype).unsqueeze(1))

    def validation_step(self, batch, batch_idx):
        # Fixed noise per batch so the early-stopping signal does not jitter between checks.
        generator = torch.Generator(device=batch["sources"].device).manual_seed(batch_idx)
        per_source = self.as_metric(self.objective(batch["sources"], generator).float().mean(dim=0))
        batch_size = batch["sources"].shape[0]
        self.log(f"val/{self.metric}", per_source.mean(), sync_dist=True, batch_size=batch_size, prog_bar=True)
        for name, value in zip(self.sources, per_source):
            self.log(f"val/{self.metric}_{name}", value, sync_dist=True, batch_size=batch_size)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)
        times, total = self.hparams.lr_decay_times, self.hparams.schedule_steps
        # Paper 003: lr x0.6 in a fixed five-step schedule, here evenly spaced over the run.
        milestones = [round(total * i / (times + 1)) for i in range(1, times + 1)]
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=self.hparams.lr_decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        save_rng_states(checkpoint)
        checkpoint["skipped_per_prior"] = list(self.skipped_per_prior)

    def on_load_checkpoint(self, checkpoint):
        restore_rng_states(checkpoint)
        skipped = checkpoint.get("skipped_per_prior")
        if skipped and len(skipped) == len(self.sources):
            self.skipped_per_prior = list(skipped)
