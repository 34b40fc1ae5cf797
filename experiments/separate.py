"""Langevin separation with a run's priors: the toy test set as a trainer ``test`` loop, or a user's file.

    {output_root}/{experiment}/{run_name}/separation/{algorithm}_{sources}/
        separation.csv (one row per mixture and method), summary.json, summary.md, trace.png,
        config.yaml, wav/{index}/{mix, reference_<source>, <method>_<source>}.wav
"""
import json
import logging
import math
import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

from callbacks.atomic_io import atomic_write_text
from callbacks.separation_report import SeparationReport
from datamodules.audio_file import read_mono, write_wav
from datamodules.registry import build_datamodule
from experiments.config import ConfigError, save_config, to_dict
from experiments.run_layout import basis_sigmas, canonical_sigma, experiment_dir, finished_sigmas, load_prior, prior_dir
from experiments.trainer_factory import run_test_loop
from lightning_modules.langevin import LangevinSeparator, basis_levels, mixing_weights, sgld_levels
from lightning_modules.nn.source_subset import SourceSubset
from lightning_modules.separation import SEED_STRIDE, SeparationModule

log = logging.getLogger(__name__)
ALGORITHMS = ("basis", "sgld")


def separation_sources(config):
    sources = list(config.separation.sources or config.data.sources)
    unknown = [s for s in sources if s not in config.data.sources]
    if unknown or len(set(sources)) != len(sources) or len(sources) < 2:
        raise ConfigError(
            f"separation.sources must be at least two distinct sources from the run's priors "
            f"{list(config.data.sources)}; got {sources}"
        )
    return sources


def levels_for(config):
    sep = config.separation
    if sep.algorithm == "basis":
        return basis_levels(basis_sigmas(sep.levels, sep.sigma_max, sep.sigma_min)[::-1], sep.delta, sep.steps_per_level)
    if sep.algorithm == "sgld":
        return sgld_levels(sep.sgld_eta, sep.sgld_gamma, sep.sgld_steps, canonical_sigma(sep.sgld_prior_sigma))
    raise ConfigError(f"unknown separation.algorithm {sep.algorithm!r}; choose from {list(ALGORITHMS)}")


def nearest(sigma, available):
    """The finished level nearest in log-sigma (noiseless counts as 1e-4)."""
    return min(available, key=lambda a: abs(math.log(max(a, 1e-4)) - math.log(max(sigma, 1e-4))))


def prior_sigmas(config, wanted):
    """Which finished prior serves each wanted noise level, per separation.prior_levels."""
    available = finished_sigmas(config)
    if not available:
        raise FileNotFoundError(
            f"no finished prior under {experiment_dir(config)}; train it first: "
            f"make train EXPERIMENT={config.experiment} PRESET={config.preset}"
        )
    policy = config.separation.prior_levels
    if policy == "nearest":
        return [nearest(s, available) for s in wanted]
    if policy != "exact":
        raise ConfigError(f"unknown separation.prior_levels {policy!r}; choose 'exact' or 'nearest'")
    missing = sorted({s for s in wanted if s not in available})
    if missing:
        raise FileNotFoundError(
            f"no prior fine-tuned at sigma {missing} under {experiment_dir(config)} (finished: {available}). "
            f"Run make finetune-noise-all GRID=basis EXPERIMENT={config.experiment} PRESET={config.preset}, "
            f"or pass separation.prior_levels=nearest to use the nearest finished levels"
        )
    return list(wanted)


def build_separator(config):
    """(separator, selection prior, sources, the prior sigma actually used at each level)."""
    sep, sources = config.separation, separation_sources(config)
    levels = levels_for(config)
    wanted = [level.sigma for level in levels]
    selection_wanted = wanted[-1] if sep.selection_sigma is None else canonical_sigma(sep.selection_sigma)
    used = prior_sigmas(config, wanted + [selection_wanted])
    loaded = {}
    for sigma in sorted(set(used)):
        prior = load_prior(prior_dir(config, sigma), list(config.data.sources), to_dict(config.model)).prior
        if not getattr(prior, "has_density_gradient", True):
            raise ConfigError(
                f"the priors of {experiment_dir(config)} have no density gradient (a mu-law WaveNet scores "
                f"discrete classes); Langevin needs model.likelihood=smoothed: train a run with it"
            )
        loaded[sigma] = SourceSubset(prior, list(config.data.sources), sources).eval()
    alpha = mixing_weights(sep.mixing, len(sources), sep.mixing_weights)
    separator = LangevinSeparator([loaded[s] for s in used[:-1]], levels, alpha, sep.init_range)
    return separator, loaded[used[-1]], sources, used


def check_length(separator, length):
    multiple = getattr(separator.priors[0].prior, "length_multiple", 1)
    if length % multiple:
        raise ConfigError(f"separation.length {length} must be a multiple of {multiple} for these priors")


def output_name(config, sources):
    return config.separation.name or f"{config.separation.algorithm}_{'-'.join(sources)}"


def run_separation(config):
    """Separate the first ``separation.n_test`` test mixtures of the run's dataset; returns (results, out_dir)."""
    sep = config.separation
    separator, selection_prior, sources, used = build_separator(config)
    length = sep.length or config.data.eval_length
    check_length(separator, length)
    data = OmegaConf.merge(config.data, {"sources": sources, "eval_length": length, "eval_batch_size": sep.batch_size})
    out_dir = experiment_dir(config) / "separation" / output_name(config, sources)
    module = SeparationModule(separator, sources, sep.algorithm, sep.n_chains, selection_prior, seed=sep.seed,
                              sample_rate=config.data.sample_rate, museval=sep.museval)
    record = to_dict(config) | {"prior_sigma_per_level": used[:-1], "selection_prior_sigma": used[-1]}
    report = SeparationReport(out_dir, config.data.sample_rate, record, sep.write_wavs, sep.n_audio_examples)
    datamodule = build_datamodule(data, seed=config.seed, n_test=sep.n_test, output_root=config.output_root)
    datamodule.setup("test")  # a bad dataset root stops here, before anything is written
    results = run_test_loop(config, module, datamodule, out_dir, "separation", [report])
    log.info("separation written to %s", out_dir)
    return results, out_dir


@torch.no_grad()
def separate_file(config, mix_path, out_dir, force=False):
    """Separate a user's audio file chunk by chunk; writes <source>.wav, mix.wav, separation.json and
    config.yaml into ``out_dir`` (all at once, so a failed run leaves nothing half-written)."""
    sep, out_dir = config.separation, Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(f"{out_dir} already exists and is not empty; choose another OUT or pass FORCE=1")
    audio, notes = read_mono(mix_path, config.data.sample_rate, sep.min_seconds)
    for note in notes:
        log.warning("%s: %s", mix_path, note)
    separator, selection_prior, sources, used = build_separator(config)
    length = sep.length or config.data.eval_length
    check_length(separator, length)
    device = torch.device("cuda" if torch.cuda.is_available() and config.trainer.accelerator != "cpu" else "cpu")
    separator, selection_prior = separator.to(device), selection_prior.to(device)
    n_samples = audio.shape[0]
    chunks = torch.nn.functional.pad(audio, (0, -n_samples % length)).view(-1, length).to(device)
    estimates, chunk_logliks, chosen_chains = [], [], []
    for start in range(0, chunks.shape[0], sep.batch_size):
        batch = chunks[start:start + sep.batch_size]
        seeds = [sep.seed * SEED_STRIDE + start + i for i in range(batch.shape[0])]
        samples, _ = separator(batch, sep.n_chains, seeds)  # [b, C, N, L]
        loglik = selection_prior.log_prob(samples.flatten(0, 1)).float().mean(dim=1).view(batch.shape[0], -1)
        best = loglik.nan_to_num(nan=-math.inf).argmax(dim=1)
        estimates.append(samples[torch.arange(batch.shape[0]), best])
        chunk_logliks += loglik.max(dim=1).values.tolist()
        chosen_chains += best.tolist()
    separated = torch.cat(estimates).permute(1, 0, 2).reshape(len(sources), -1)[:, :n_samples].cpu()
    residual = audio - (separator.alpha.cpu().unsqueeze(1) * separated).sum(dim=0)
    info = {
        "input": str(mix_path), "notes": notes, "sources": sources, "sample_rate": config.data.sample_rate,
        "chunk_length": length, "n_chunks": chunks.shape[0], "n_chains": sep.n_chains,
        "chosen_chain_per_chunk": chosen_chains, "selection_loglik_per_chunk": chunk_logliks,
        "mix_error": float(residual.double().pow(2).mean()), "prior_sigma_per_level": used[:-1],
        "selection_prior_sigma": used[-1], "seed": sep.seed,
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        write_wav(staging / "mix.wav", audio, config.data.sample_rate)
        for name, track in zip(sources, separated):
            write_wav(staging / f"{name}.wav", track, config.data.sample_rate)
        atomic_write_text(staging / "separation.json", json.dumps(info, indent=2))
        save_config(config, staging / "config.yaml")
        replace_dir(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("separated %s into %s", mix_path, out_dir)
    return out_dir, info


def replace_dir(new, target):
    """Put ``new`` at ``target``; an old ``target`` (only reached with FORCE) is removed after the swap."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
