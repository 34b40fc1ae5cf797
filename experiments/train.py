"""Training of the noiseless priors and their noise fine-tuning (paper 003 section 3.3; paper 004 section 3.5).

Rerunning an interrupted command resumes from the run's ``last.ckpt`` (weights, optimizer, scheduler,
step, RNG); a finished run (``done.json``) is left alone.
"""
import logging
from pathlib import Path

from callbacks.atomic_checkpoint_io import read_checkpoint
from experiments.config import to_dict
from experiments.fitting import family_data, family_sources, fit
from experiments.run_layout import PAPER003_SIGMAS, basis_sigmas, check_compatible, is_done, prior_dir
from lightning_modules.prior_module import PriorModule
from lightning_modules.prior_registry import is_noise_conditional

log = logging.getLogger(__name__)


def train_noiseless(config, pooled=False):
    """The noiseless per-source priors, or (``pooled``) one prior of the same family on every source pooled."""
    if config.model.name == "lqvae":
        from experiments.train_lqvae import train_both

        return train_both(config, pooled)  # stage 1 (the LQ-VAE), then stage 2 (its latent priors)
    run_dir = prior_dir(config, 0.0, pooled=pooled)
    module = PriorModule(
        model=to_dict(config.model), sources=family_sources(config, pooled), lr=config.optim.lr,
        lr_decay=config.optim.lr_decay, lr_decay_times=config.optim.lr_decay_times,
        schedule_steps=config.trainer.max_steps, noise_sigma=0.0, seed=config.seed,
    )
    return fit(config, run_dir, module, config.trainer.max_steps, config.trainer.val_check_interval,
               job_type="train", early_stopping=False, datamodule=family_data(config, pooled),
               extra={"pooled_sources": list(config.data.sources)} if pooled else None)


def finetune(config, sigma, init_dir=None, grid="paper003", pooled=False):
    """Continue from the noiseless prior (or ``init_dir``) on x + N(0, sigma^2), until every prior's
    validation likelihood stops improving or ``finetune.max_steps``; each prior keeps its best weights.
    The result goes to ``grid``'s layout."""
    if config.model.name == "lqvae":
        raise ValueError("the LQ-VAE family's priors model discrete codes: noise fine-tuning does not apply; "
                         "its one noiseless run (make train-toy-lqvae) is the model")
    init_dir = Path(init_dir) if init_dir else prior_dir(config, 0.0, pooled=pooled)
    if not is_done(init_dir):
        command = "train-pooled" if pooled else "train"
        raise FileNotFoundError(
            f"no finished prior to fine-tune from at {init_dir}; run the training first "
            f"(make {command} EXPERIMENT={config.experiment} PRESET={config.preset}) or finish the previous noise level"
        )
    run_dir = prior_dir(config, sigma, grid, pooled=pooled)
    sources = family_sources(config, pooled)
    module = PriorModule(
        model=to_dict(config.model), sources=sources, lr=config.finetune.lr,
        lr_decay_times=0, schedule_steps=config.finetune.max_steps, noise_sigma=sigma, seed=config.seed,
    )
    if not (run_dir / "last.ckpt").is_file():
        checkpoint = read_checkpoint(init_dir / "last.ckpt")
        check_compatible(init_dir / "last.ckpt", checkpoint["hyper_parameters"], sources, to_dict(config.model))
        module.load_state_dict(checkpoint["state_dict"])
    extra = {"init_from": str(init_dir), "grid": grid}
    if pooled:
        extra["pooled_sources"] = list(config.data.sources)
    return fit(config, run_dir, module, config.finetune.max_steps, config.finetune.val_check_interval,
               job_type="finetune", early_stopping=True, extra=extra, datamodule=family_data(config, pooled))


def finetune_grid(config, pooled=False):
    """paper003: each level from the noiseless prior; basis: serially, each from its smaller neighbour.
    A noise-conditional family (score priors) has nothing to fine-tune: its one network serves every level."""
    if is_noise_conditional(to_dict(config.model)) or config.model.name == "lqvae":
        log.info("%s: %s priors need no noise fine-tuning; nothing to do", config.experiment, config.model.name)
        return []
    if config.finetune.grid == "paper003":
        return [finetune(config, sigma, pooled=pooled) for sigma in PAPER003_SIGMAS]
    if config.finetune.grid == "basis":
        results, previous = [], None
        for sigma in basis_sigmas():
            results.append(finetune(config, sigma, init_dir=previous, grid="basis", pooled=pooled))
            previous = prior_dir(config, sigma, "basis", pooled=pooled)
        return results
    raise ValueError(f"unknown finetune.grid {config.finetune.grid!r}; choose 'paper003' or 'basis'")
