"""One place that turns the config's trainer section into a Lightning Trainer with our loggers,
atomic checkpointing and resumable ``last.ckpt``."""
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, WandbLogger

from callbacks.atomic_checkpoint_io import AtomicCheckpointIO
from experiments.config import save_config, to_dict


def build_loggers(config, run_dir, job_type):
    loggers = [CSVLogger(str(run_dir), name="logs", version="")]
    if config.wandb.enabled:
        # Offline by design: no account and no network unless the user asks for it.
        os.environ.setdefault("WANDB_MODE", config.wandb.mode or "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        wandb_dir = Path(config.output_root) / "wandb"
        wandb_dir.mkdir(parents=True, exist_ok=True)
        loggers.append(WandbLogger(
            project=config.wandb.project, save_dir=str(wandb_dir), job_type=job_type,
            group=f"{config.experiment}/{config.run_name}", name=f"{config.run_name}/{Path(run_dir).name}",
            config=to_dict(config),
        ))
    return loggers


def compile_prior(module):
    """``trainer.compile``: the prior's ``log_prob`` and ``training_loss`` (where it has them) through
    ``torch.compile``; the weights and the state_dict are the module's own, so checkpoints are unchanged."""
    priors = [getattr(module, "prior", None)]
    schedule = getattr(module, "prior_schedule", None)  # a posterior's coarser levels (posterior.prior_sigmas)
    if schedule is not None:
        priors += [p for p in schedule.priors() if all(p is not q for q in priors)]
    for prior in priors:
        for name in ("log_prob", "training_loss"):
            method = getattr(prior, name, None)
            if method is not None:
                setattr(prior, name, torch.compile(method))


def build_trainer(config, run_dir, job_type, callbacks=(), max_steps=-1, val_check_interval=None):
    t = config.trainer
    return pl.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        precision=t.precision,
        num_nodes=t.num_nodes,
        max_steps=max_steps,
        max_time=t.max_time,
        val_check_interval=val_check_interval,
        check_val_every_n_epoch=None if val_check_interval else 1,
        limit_val_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=config.optim.gradient_clip_val or None,
        enable_progress_bar=t.enable_progress_bar,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        logger=build_loggers(config, run_dir, job_type),
        callbacks=list(callbacks),
        default_root_dir=str(run_dir),
    )


def run_test_loop(config, module, datamodule, out_dir, job_type, callbacks):
    """``trainer.test`` with our loggers; the resolved config is saved beside the results (rank zero)."""
    trainer = build_trainer(config, out_dir, job_type, callbacks=callbacks)
    trainer.test(module, datamodule=datamodule)
    if trainer.is_global_zero:
        save_config(config, Path(out_dir) / "config.yaml")
    finish_loggers(trainer)
    return module.results


def finish_loggers(trainer):
    """Close this job's loggers; the W&B run too, so that the next job of the same command (the LQ-VAE's
    report, its second stage, the next noise level) starts its own run instead of reusing this one."""
    for logger in trainer.loggers:
        logger.finalize("success")
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()
