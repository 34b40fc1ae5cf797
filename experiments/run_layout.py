"""Where each run lives, how a finished run is marked, and how its priors are loaded back.

    {output_root}/{experiment}/{run_name}/noiseless/        last.ckpt, config.yaml, done.json, logs/
    {output_root}/{experiment}/{run_name}/sigma_0.077/      the same, fine-tuned at sigma = 0.077 from the
                                                            noiseless prior (make finetune-noise, GRID=paper003)
    {output_root}/{experiment}/{run_name}/basis_grid/sigma_0.0774/  the BASIS grid: each level fine-tuned from
                                                            its smaller neighbour (GRID=basis)
    {output_root}/{experiment}/{run_name}/cross_likelihood/ CSV, JSON, PNG, Markdown, config.yaml
    {output_root}/{experiment}/{run_name}/pooled/noiseless/, pooled/sigma_0.077/, ...  the generic prior
                                                            trained on every source pooled (make train-pooled)
"""
import json
import math
from pathlib import Path

from callbacks.atomic_checkpoint_io import read_checkpoint
from datamodules.atomic_io import atomic_write_text
from lightning_modules.samplers.noise_levels import basis_sigmas, canonical_sigma  # noqa: F401 (the layout's names)

PAPER003_SIGMAS = (0.01, 0.027, 0.077, 0.129, 0.359)


def parse_sigma(value):
    """A user-given SIGMA: a finite number > 0, else a ValueError that says how to fix it."""
    try:
        sigma = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"SIGMA must be a positive number such as 0.077, got {value!r}") from None
    if not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"SIGMA must be a positive finite number such as 0.077, got {value!r}")
    return canonical_sigma(sigma)


def experiment_dir(config):
    return Path(config.output_root) / config.experiment / config.run_name


GRIDS = ("paper003", "basis")
# The two grids initialise their levels differently (paper003: from the noiseless prior; basis: from
# the neighbouring level), so they never share a directory, even where their sigmas coincide.
GRID_SUBDIR = {"paper003": "", "basis": "basis_grid"}


def check_grid(grid):
    if grid not in GRIDS:
        raise ValueError(f"unknown finetune.grid {grid!r}; choose from {list(GRIDS)}")
    return grid


def family_dir(config, pooled=False):
    """The folder of the run's per-source priors, or of its pooled prior (one prior of all sources)."""
    return experiment_dir(config) / "pooled" if pooled else experiment_dir(config)


def prior_dir(config, sigma=0.0, grid="paper003", pooled=False):
    """The run folder of the prior at ``sigma`` (0 = noiseless, shared by both grids) in ``grid``'s layout."""
    if sigma == 0:
        return family_dir(config, pooled) / "noiseless"
    folder = family_dir(config, pooled) / GRID_SUBDIR[check_grid(grid)]
    return folder / f"sigma_{canonical_sigma(sigma):g}"


def is_done(run_dir):
    return (Path(run_dir) / "done.json").is_file()


def mark_done(run_dir, info):
    atomic_write_text(Path(run_dir) / "done.json", json.dumps(info, indent=2))


def finished_sigmas(config, grid="paper003", pooled=False):
    """Noise levels (0 = noiseless) whose training finished in ``grid``'s layout, sorted."""
    root = family_dir(config, pooled)
    found = [0.0] if is_done(root / "noiseless") else []
    for path in (root / GRID_SUBDIR[check_grid(grid)]).glob("sigma_*"):
        if is_done(path):
            found.append(float(path.name.removeprefix("sigma_")))
    return sorted(found)


def finished_priors(config, grids):
    """Every finished prior of ``grids`` as {"sigma", "grid", "dir"}, earlier grids first; the noiseless
    prior (shared by both layouts) once."""
    found = []
    for grid in grids:
        for sigma in finished_sigmas(config, grid):
            directory = str(prior_dir(config, sigma, grid))
            if all(directory != f["dir"] for f in found):
                found.append({"sigma": sigma, "grid": "noiseless" if sigma == 0 else grid, "dir": directory})
    return found


def no_prior_error(config):
    return FileNotFoundError(
        f"no finished prior under {experiment_dir(config)}; train it first: "
        f"make train EXPERIMENT={config.experiment} PRESET={config.preset}"
    )


def load_prior(run_dir, expected_sources=None, expected_model=None):
    """Load a trained PriorModule from ``run_dir/last.ckpt`` (``weights_only=True``)."""
    from lightning_modules.prior_module import PriorModule

    path = Path(run_dir) / "last.ckpt"
    checkpoint = read_checkpoint(path)
    hparams = checkpoint["hyper_parameters"]
    check_compatible(path, hparams, expected_sources, expected_model)
    module = PriorModule(**hparams)
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


def check_compatible(path, hparams, expected_sources=None, expected_model=None):
    if expected_model is not None:
        from lightning_modules.prior_registry import resolve_model_config

        stored_family = (hparams.get("model") or {}).get("name")
        expected_family = resolve_model_config(expected_model)["name"]
        if stored_family != expected_family:
            raise ValueError(f"checkpoint {path}: this run holds a {stored_family} prior, the experiment expects "
                             f"{expected_family}; choose the experiment it was trained with, or another run_name")
    problems = []
    if expected_sources is not None and list(hparams["sources"]) != list(expected_sources):
        problems.append(f"sources {list(hparams['sources'])} != configured {list(expected_sources)}")
    if expected_model is not None:
        from lightning_modules.prior_registry import resolve_model_config

        stored, expected = resolve_model_config(hparams["model"]), resolve_model_config(expected_model)
        diff = {k: (stored.get(k), expected.get(k)) for k in stored.keys() | expected.keys()
                if stored.get(k) != expected.get(k)}
        if diff:
            problems.append(f"model options (checkpoint, configured) differ: {diff}")
    if problems:
        raise ValueError(
            f"checkpoint {path} does not match this configuration: " + "; ".join(problems)
            + ". Use the preset/run_name it was trained with, or train a new run."
        )
