"""The denoiser-quality report of a score prior's training (lightning_modules/metrics/denoiser_quality.py):
logged at every validation (on the EMA weights when there are any) as ``denoise/<source>/noise_left_<sigma>``,
and written at the end of training beside the checkpoint as denoiser_quality.{json,md}."""
import json
from pathlib import Path

import pytorch_lightning as pl
import torch

from datamodules.atomic_io import atomic_write_text
from lightning_modules.metrics.denoiser_quality import denoiser_quality, quality_markdown

N_CROPS = 8


class DenoiserQualityReport(pl.Callback):
    """Listed after the EMA callback: its validation hooks then see the averaged weights."""

    def __init__(self, sources, run_dir):
        self.sources, self.run_dir, self.crops, self.latest = list(sources), Path(run_dir), None, None

    def fixed_crops(self, trainer, device):
        if self.crops is None:  # the first validation batch, once: the same crops at every check
            batch = next(iter(trainer.datamodule.val_dataloader()))
            self.crops = batch["sources"][:N_CROPS].detach().cpu()
        return self.crops.to(device)

    def measure(self, trainer, pl_module):
        with torch.autocast(pl_module.device.type, enabled=False):
            return denoiser_quality(pl_module.prior, self.fixed_crops(trainer, pl_module.device))

    def on_validation_epoch_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.latest = self.measure(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module):
        if self.latest is None:
            return
        for sigma, row in zip(self.latest["sigmas"], self.latest["noise_left"]):
            for source, value in zip(self.sources, row):
                pl_module.log(f"denoise/{source}/noise_left_{sigma:g}", value, rank_zero_only=True)
        self.latest = None

    def on_train_end(self, trainer, pl_module):
        report = {"sources": self.sources, "global_step": trainer.global_step, "n_crops": N_CROPS,
                  **self.measure(trainer, pl_module)}
        if trainer.is_global_zero:
            write_quality(self.run_dir, report)


def write_quality(folder, report):
    atomic_write_text(Path(folder) / "denoiser_quality.json", json.dumps(report, indent=2))
    atomic_write_text(Path(folder) / "denoiser_quality.md", quality_markdown(report, report["sources"]))
