"""Separation of a user's audio file with a run's priors (``make separate MIX=song.wav OUT=dir``): the file is
cut into chunks of ``separation.length`` samples, each separated like a test mixture; the output folder is
written all at once, so a failed run leaves nothing half-written.
"""
import json
import logging
import math
import shutil
import tempfile
from pathlib import Path

import torch

from datamodules.atomic_io import atomic_write_text
from datamodules.audio_file import read_mono, write_wav
from experiments.config import save_config
from experiments.separate import build_separator
from lightning_modules.separation import SEED_STRIDE, selection_scores

log = logging.getLogger(__name__)


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
    separator, selection_prior, sources, record = build_separator(config)
    length = sep.length or config.data.eval_length
    device = torch.device("cuda" if torch.cuda.is_available() and config.trainer.accelerator != "cpu" else "cpu")
    separator, selection_prior = separator.to(device), selection_prior.to(device)
    n_samples = audio.shape[0]
    chunks = torch.nn.functional.pad(audio, (0, -n_samples % length)).view(-1, length).to(device)
    estimates, chunk_scores, chosen_chains = [], [], []
    for start in range(0, chunks.shape[0], sep.batch_size):
        batch = chunks[start:start + sep.batch_size]
        seeds = [sep.seed * SEED_STRIDE + start + i for i in range(batch.shape[0])]
        samples, trace = separator(batch, sep.n_chains, seeds)  # [b, C, N, L]
        mean = trace.get("point_estimates", {}).get("mean")
        if mean is not None:  # the variational posterior's mean beats any one of its samples (README)
            estimates.append(mean)
            continue
        scores = selection_scores(selection_prior, samples.flatten(0, 1)).mean(dim=1).view(batch.shape[0], -1)
        best = scores.nan_to_num(nan=-math.inf).argmax(dim=1)
        estimates.append(samples[torch.arange(batch.shape[0]), best])
        chunk_scores += scores.max(dim=1).values.tolist()
        chosen_chains += best.tolist()
    separated = torch.cat(estimates).permute(1, 0, 2).reshape(len(sources), -1)[:, :n_samples].cpu()
    residual = audio - (separator.alpha.cpu().unsqueeze(1) * separated).sum(dim=0)
    info = {
        "input": str(mix_path), "notes": notes, "sources": sources, "sample_rate": config.data.sample_rate,
        "chunk_length": length, "n_chunks": chunks.shape[0], "n_chains": sep.n_chains,
        "estimate": "selected chain" if chosen_chains else "posterior mean",
        "chosen_chain_per_chunk": chosen_chains, "selection_score_per_chunk": chunk_scores,
        "mix_error": float(residual.double().pow(2).mean()), "seed": sep.seed, **record,
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
