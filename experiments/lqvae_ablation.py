"""The linearisation-loss ablation (paper 002 section 4.2): the same LQ-VAE trained without L_lin
(model.lin_weight=0, run ``<run_name>_no_lin``), and both stage-1 reports side by side.

    make lqvae-ablation                  -> runs/toy_lqvae/default/lin_ablation.{md,json}

The run with the loss is the experiment's own stage 1 (trained first if missing)."""
import copy
import json

from datamodules.atomic_io import atomic_write_text
from experiments.config import to_dict
from experiments.run_layout import experiment_dir
from experiments.train_lqvae import lqvae_dir, train_lqvae
from lightning_modules.prior_registry import resolve_model_config

METRICS = (("lin_error_mean", "held-out linearisation error (mean over elements)", "lower"),
           ("lin_error_relative_mean", "relative to ||B_Q(E(mix))||^2", "lower"),
           ("lin_code_agreement_mean", "latent steps where the two codes agree", "higher"),
           ("si_sdr_mean", "reconstruction SI-SDR, mean over classes (dB)", "higher"),
           ("perplexity_all", "codebook perplexity", "higher"))


def report(config):
    path = lqvae_dir(config) / "report" / "lqvae_report.json"
    return json.loads(path.read_text())["results"]


def run_ablation(config):
    without = copy.deepcopy(config)
    without.run_name = f"{config.run_name}_no_lin"
    without.model.lin_weight = 0.0
    lin_weight = resolve_model_config(to_dict(config.model))["lin_weight"]
    if not lin_weight:
        raise ValueError("the ablation compares against model.lin_weight > 0; this configuration has it at 0")
    train_lqvae(config)
    train_lqvae(without)
    with_loss, without_loss = report(config), report(without)
    rows = [{"metric": key, "meaning": meaning, "better": better, "with_lin": with_loss[key],
             "without_lin": without_loss[key]} for key, meaning, better in METRICS]
    group = "pair" if with_loss.get("lin_sources", 2) == 2 else f"group of {with_loss['lin_sources']} sources"
    lines = [f"# Linearisation loss ablation ({config.experiment}, {with_loss['count']} held-out test mixtures "
             f"per {group})", "",
             f"| metric | better | with L_lin (weight {lin_weight:g}) | without |", "|---|---|---|---|"]
    lines += [f"| {r['meaning']} | {r['better']} | {r['with_lin']:.4g} | {r['without_lin']:.4g} |" for r in rows]
    lines += ["", f"Per {group}: " + ", ".join(
        f"{pair} {with_loss['lin_error'][s]:.4g} vs {without_loss['lin_error'][s]:.4g}"
        for s, pair in zip(with_loss["sources"], with_loss["lin_pairs"])), ""]
    out = experiment_dir(config)
    atomic_write_text(out / "lin_ablation.md", "\n".join(lines))
    atomic_write_text(out / "lin_ablation.json", json.dumps({"rows": rows, "with_lin": with_loss,
                                                             "without_lin": without_loss}, indent=2))
    return out / "lin_ablation.md"
