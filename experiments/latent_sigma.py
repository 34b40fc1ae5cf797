"""``separation.latent_sigma=auto``: the latent likelihood's sigma chosen on solo crops of the validation split
(lightning_modules/samplers/latent_sigma.py says why and how). Never the test split."""
import logging

import torch

from datamodules.registry import build_datamodule
from lightning_modules.samplers.latent_sigma import best_sigma, truth_log_posterior

log = logging.getLogger(__name__)
N_CROPS = 16


def validation_crops(config, sources, n_crops=N_CROPS):
    """[n, len(sources), eval_length] solo crops of the first validation examples."""
    datamodule = build_datamodule(config.data, seed=config.seed, output_root=config.output_root)
    datamodule.setup("validate")
    rows = [list(config.data.sources).index(name) for name in sources]
    crops, count = [], 0
    for batch in datamodule.val_dataloader():
        crops.append(batch["sources"][:, rows])
        count += crops[-1].shape[0]
        if count >= n_crops:
            break
    if not crops:
        raise ValueError(f"separation.latent_sigma=auto needs validation crops of {sources}, and the validation "
                         f"split has none; set data.n_val > 0 or pass a number, e.g. separation.latent_sigma=0.05")
    return torch.cat(crops)[:n_crops]


def calibrate_latent_sigma(config, separator, sources):
    """Sets the separator's sigma to the calibrated one; -> (sigma, {sigma: mean log p(true pair)})."""
    crops = validation_crops(config, sources).to(separator.alpha.device)
    table = truth_log_posterior(separator, crops)
    sigma = best_sigma(table)
    separator.set_sigma(sigma)
    log.info("latent_sigma=auto: %g (mean log p of the true pair per step on %d validation crops: %s)", sigma,
             crops.shape[0], ", ".join(f"{s:g}: {v:.2f}" for s, v in table.items()))
    return sigma, table
