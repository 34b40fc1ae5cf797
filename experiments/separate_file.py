"""Separation of a user's audio file with a run's priors (``make separate MIX=song.wav OUT=dir``): the file is
cut into chunks of ``separation.length`` samples, each separated like a test mixture; the output folder is
written all at once, so a failed run leaves nothing half-written.

The whole request (the output folder, the mixture, the sources) is checked before any prior is loaded. FORCE
replaces only an earlier separation's own files, recognised by its marker ``separation.json``; a folder
holding anything else is refused, never emptied.
"""
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from datamodules.atomic_io import atomic_write_text
from datamodules.audio_file import read_mono, write_wav
from experiments.config import ConfigError, save_config
from experiments.separate import build_separator, separation_sources
from lightning_modules.samplers.wiener_filter import check_window
from lightning_modules.separation import SEED_STRIDE, post_filter, selection_scores

log = logging.getLogger(__name__)


@torch.no_grad()
def separate_file(config, mix_path, out_dir, force=False):
    """Separate a user's audio file chunk by chunk; writes <source>.wav, mix.wav, separation.json and
    config.yaml into ``out_dir`` (all at once, so a failed run leaves nothing half-written)."""
    sep = config.separation
    out_dir = check_output_dir(out_dir, force)
    check_window(sep.wiener_fft)
    audio, notes = read_mono(mix_path, config.data.sample_rate, sep.min_seconds)
    separation_sources(config)
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
        if mean is not None:  # the variational posterior's mean beats any one of its samples (docs/variational.md)
            estimates.append(mean)
            continue
        scores = selection_scores(selection_prior, samples.flatten(0, 1)).mean(dim=1).view(batch.shape[0], -1)
        best = scores.nan_to_num(nan=-math.inf).argmax(dim=1)
        estimates.append(samples[torch.arange(batch.shape[0]), best])
        chunk_scores += scores.max(dim=1).values.tolist()
        chosen_chains += best.tolist()
    separated = torch.cat(estimates).permute(1, 0, 2).reshape(len(sources), -1)[:, :n_samples].cpu()
    # On the whole file: the Wiener filter's windows cross the chunk borders.
    separated = post_filter(audio, separated, separator.alpha.cpu(), sep.wiener_fft, sep.mixture_consistency)
    residual = audio - (separator.alpha.cpu().unsqueeze(1) * separated).sum(dim=0)
    info = {
        "input": str(mix_path), "notes": notes, "sources": sources, "sample_rate": config.data.sample_rate,
        "chunk_length": length, "n_chunks": chunks.shape[0], "n_chains": sep.n_chains,
        "estimate": "selected chain" if chosen_chains else "posterior mean",
        "chosen_chain_per_chunk": chosen_chains, "selection_score_per_chunk": chunk_scores,
        "mix_error": float(residual.double().pow(2).mean()), "mixture_consistency": sep.mixture_consistency,
        "wiener_fft": sep.wiener_fft,
        "seed": sep.seed, **record,
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes the folder private; the output gets the user's usual mode
    try:
        write_wav(staging / "mix.wav", audio, config.data.sample_rate)
        for name, track in zip(sources, separated):
            write_wav(staging / f"{name}.wav", track, config.data.sample_rate)
        atomic_write_text(staging / "separation.json", json.dumps(info, indent=2))
        save_config(config, staging / "config.yaml")
        replace_dir(staging, check_output_dir(out_dir, force))  # again: the folder may have changed meanwhile
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("separated %s into %s", mix_path, out_dir)
    return out_dir, info


MARKER = "separation.json"


def check_output_dir(out_dir, force):
    """The resolved output folder, if this separation may write it: new, empty, or (with FORCE) an earlier
    separation's own files and nothing else; its parent writable. Otherwise an error that says what to do."""
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.parent == out_dir:
        raise ConfigError(f"OUT={out_dir} is the file system's root; give a folder for the separated sources")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"OUT={out_dir} is a file, not a folder; choose another OUT")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise FileExistsError(f"OUT={out_dir} already exists and is not empty; choose another OUT, or pass "
                                  f"FORCE=1 to replace an earlier separation written there")
        earlier_separation_files(out_dir)
    check_writable(out_dir.parent)
    return out_dir


def earlier_separation_files(out_dir):
    """The files an earlier separation wrote in ``out_dir`` (read from its marker); FORCE replaces those only."""
    marker = out_dir / MARKER
    try:
        sources = json.loads(marker.read_text())["sources"]
    except (OSError, ValueError, KeyError, TypeError):
        raise FileExistsError(f"OUT={out_dir} is not empty and does not hold a separation (no readable {MARKER}): "
                              f"FORCE replaces only an earlier separation's folder; choose another OUT") from None
    ours = {MARKER, "config.yaml", "mix.wav", *(f"{name}.wav" for name in sources)}
    others = sorted(p.name for p in out_dir.iterdir() if p.name not in ours or not p.is_file())
    if others:
        raise FileExistsError(f"OUT={out_dir} holds files a separation did not write ({', '.join(others[:5])}); "
                              f"FORCE replaces only an earlier separation's files: move them or choose another OUT")
    return [out_dir / name for name in ours if (out_dir / name).is_file()]


def check_writable(folder):
    """Write and remove a probe file in ``folder`` (or its nearest existing parent, where the folder will be
    made): permission bits do not tell about a read-only file system, nor about root."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write_probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise ConfigError(f"cannot write in {existing} ({error.strerror}); choose an OUT in a writable folder") from None


def replace_dir(new, target):
    """Put ``new`` at ``target``. An old ``target`` (empty, or an earlier separation's, checked just before) is
    moved aside and then emptied file by file: only the files its marker names are deleted."""
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        new.rename(target)
        return
    ours = earlier_separation_files(target)
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old."))
    old.rmdir()
    target.rename(old)
    new.rename(target)
    for path in ours:
        (old / path.name).unlink(missing_ok=True)
    try:
        old.rmdir()
    except OSError:
        log.warning("kept %s: something appeared in the old output folder while separating", old)
