"""Separation with a run's priors: the toy test set as a trainer ``test`` loop (a user's file:
experiments/separate_file.py).

Every sampler (BASIS, SGLD, diffusion) sees the priors through one call, ``score(x, sigma)``. A
noise-conditional family (score priors) answers it at any sigma from its noiseless run; a likelihood
family (flows, smoothed WaveNet) answers it through a ``LevelScore`` of its fine-tuned levels: for
BASIS and SGLD the levels resolved by ``separation.prior_levels``, for diffusion every finished level
(the nearest serves each sigma of the schedule).

    {output_root}/{experiment}/{run_name}/separation/{algorithm}_{sources}/
        separation.csv (one row per mixture and method), summary.json, summary.md, trace.png,
        config.yaml, wav/{index}/{mix, reference_<source>, <method>_<source>}.wav
"""
import logging

import torch
from omegaconf import OmegaConf

from callbacks.separation_report import SeparationReport
from datamodules.registry import build_datamodule, dataset_mixing
from experiments.config import ConfigError, to_dict
from experiments.run_layout import (basis_sigmas, canonical_sigma, experiment_dir, finished_priors, is_done,
                                   load_prior, no_prior_error, prior_dir)
from experiments.trainer_factory import run_test_loop
from lightning_modules.nn.source_subset import SourceSubset
from lightning_modules.prior_registry import is_noise_conditional
from lightning_modules.samplers.level_score import LevelScore, log_distance
from lightning_modules.samplers.mixing import mixing_weights
from lightning_modules.samplers.registry import SAMPLERS
from lightning_modules.samplers.wiener_filter import check_window
from lightning_modules.separation import SeparationModule, selection_kind

log = logging.getLogger(__name__)
ALGORITHMS = tuple(SAMPLERS)
INITS = ("default", "variational")


def separation_sources(config):
    sources = list(config.separation.sources or config.data.sources)
    unknown = [s for s in sources if s not in config.data.sources]
    if unknown or len(set(sources)) != len(sources) or len(sources) < 2:
        raise ConfigError(
            f"separation.sources must be at least two distinct sources from the run's priors "
            f"{list(config.data.sources)}; got {sources}"
        )
    return sources


def check_algorithm(config):
    """The sampler's registry entry (lightning_modules/samplers/registry.py), once its settings are consistent."""
    sep = config.separation
    if sep.algorithm not in SAMPLERS:
        raise ConfigError(f"unknown separation.algorithm {sep.algorithm!r}; choose from {list(ALGORITHMS)}")
    if sep.init not in INITS:
        raise ConfigError(f"unknown separation.init {sep.init!r}; choose from {list(INITS)}")
    entry = SAMPLERS[sep.algorithm]
    if sep.init == "variational" and not entry.seedable:
        seedable = ", ".join(name for name, e in SAMPLERS.items() if e.seedable)
        raise ConfigError(f"separation.init=variational seeds {seedable}, not {sep.algorithm}")
    conflict = entry.check(sep) if entry.check else None
    if conflict:
        raise ConfigError(conflict)
    return entry


def missing_prior_error(config, sigmas, grid, finished):
    where = experiment_dir(config) / ("basis_grid" if grid == "basis" else "")
    args = f"EXPERIMENT={config.experiment} PRESET={config.preset}"
    if grid == "basis":
        fix = f"make finetune-noise-all GRID=basis {args}"
        if not set(sigmas) <= set(basis_sigmas()):
            fix += (" (it fine-tunes the default grid, 10 levels 1.0 -> 0.01: set separation.levels, sigma_max "
                    "and sigma_min to those)")
        what = "in the BASIS grid"
    else:
        fix = " and ".join(f"make finetune-noise SIGMA={s:g} {args}" for s in sigmas)
        fix += f" (or make finetune-noise-all GRID=basis {args} for the BASIS grid's levels)"
        what = "by make finetune-noise nor in the BASIS grid"
    return FileNotFoundError(
        f"no prior fine-tuned at sigma {sigmas} {what} under {where} (finished: "
        f"{[(f['sigma'], f['grid']) for f in finished]}). Run {fix}, or pass separation.prior_levels=nearest "
        f"to use the nearest finished levels of either layout"
    )


def resolve_priors(config, wanted):
    """Which finished prior ({"sigma", "grid", "dir"}) serves each wanted noise level, per
    separation.prior_levels. The last entry of ``wanted`` is the selection prior's level."""
    sep = config.separation
    entry = SAMPLERS[sep.algorithm]
    order = entry.grids
    finished = finished_priors(config, order)
    if not finished:
        raise no_prior_error(config)
    if sep.prior_levels == "nearest":  # min() keeps the first of equals: the algorithm's own grid
        return [min(finished, key=lambda f: log_distance(f["sigma"], sigma)) for sigma in wanted]
    if sep.prior_levels != "exact":
        raise ConfigError(f"unknown separation.prior_levels {sep.prior_levels!r}; choose 'exact' or 'nearest'")
    # A sampler's levels come from its exact_grids (BASIS: the BASIS grid only); the selection prior from any.
    grids = [entry.exact_grids or order] * (len(wanted) - 1) + [order]
    used = []
    for sigma, allowed in zip(wanted, grids):
        match = [f for f in finished if f["sigma"] == sigma and f["grid"] in (*allowed, "noiseless")]
        used.append(match[0] if match else None)
    missing = sorted({s for s, u in zip(wanted, used) if u is None})
    if missing:
        grid = "basis" if entry.exact_grids == ("basis",) and any(u is None for u in used[:-1]) else "paper003"
        raise missing_prior_error(config, missing, grid, finished)
    return used


def resolve_mixing(config, n_sources):
    """(alpha [N], record): separation.mixing_weights, else separation.mixing, else the dataset's own mixing."""
    sep = config.separation
    if sep.mixing_weights is not None:
        kind, origin = "weights", "separation.mixing_weights"
    elif sep.mixing is not None:
        kind, origin = sep.mixing, "separation.mixing"
    else:
        kind, origin = dataset_mixing(config.data.name), f"data.name={config.data.name}"
    alpha = mixing_weights(None if kind == "weights" else kind, n_sources, sep.mixing_weights)
    return alpha, {"kind": kind, "alpha": alpha.tolist(), "from": origin}


class PriorLoader:
    """Loads each run directory's prior once, as a SourceSubset of the separated sources."""

    def __init__(self, config, sources):
        self.config, self.sources, self.loaded = config, sources, {}

    def __call__(self, directory):
        directory = str(directory)
        if directory not in self.loaded:
            config = self.config
            prior = load_prior(directory, list(config.data.sources), to_dict(config.model)).prior
            if not getattr(prior, "has_density_gradient", True):
                raise ConfigError(
                    f"the priors of {experiment_dir(config)} have no density gradient (a mu-law WaveNet scores "
                    f"discrete classes); Langevin and diffusion need model.likelihood=smoothed: train a run with it"
                )
            self.loaded[directory] = SourceSubset(prior, list(config.data.sources), self.sources).eval()
        return self.loaded[directory]


def noise_conditional_priors(config, load, sigmas):
    """(score model, selection prior, record): the noiseless run serves every level and the selection."""
    directory = prior_dir(config, 0.0)
    if not is_done(directory):
        raise no_prior_error(config)
    if any(s <= 0 for s in sigmas):
        raise ConfigError(f"a score prior has no score at sigma 0 (levels {sigmas}); set "
                          f"separation.sgld_prior_sigma > 0")
    prior = load(directory)
    record = {"prior_sigma_per_level": [0.0], "prior_dir_per_level": [str(directory)],
              "prior_grid_per_level": ["noise-conditional"], "selection_prior_sigma": 0.0,
              "selection_prior_dir": str(directory)}
    return prior, prior, record


def langevin_priors(config, load, levels):
    """(LevelScore of each level's resolved prior, selection prior, record), per separation.prior_levels."""
    sep = config.separation
    wanted = [level.sigma for level in levels]
    selection_wanted = wanted[-1] if sep.selection_sigma is None else canonical_sigma(sep.selection_sigma)
    used = resolve_priors(config, wanted + [selection_wanted])
    score_model = LevelScore((level.sigma, load(u["dir"])) for level, u in zip(levels, used))
    record = {
        "prior_sigma_per_level": [u["sigma"] for u in used[:-1]],
        "prior_dir_per_level": [u["dir"] for u in used[:-1]],
        "prior_grid_per_level": [u["grid"] for u in used[:-1]],
        "selection_prior_sigma": used[-1]["sigma"], "selection_prior_dir": used[-1]["dir"],
    }
    return score_model, load(used[-1]["dir"]), record


def diffusion_priors(config, load):
    """(LevelScore of every finished level, one per sigma, selection prior, record): the schedule's sigmas
    are served by the nearest in log-sigma; the selection by the smallest sigma (or separation.selection_sigma's
    nearest)."""
    sep = config.separation
    finished = finished_priors(config, SAMPLERS[sep.algorithm].grids)
    if not finished:
        raise no_prior_error(config)
    by_sigma = {}
    for f in finished:  # the preferred grid comes first: it keeps a sigma finished in both layouts
        by_sigma.setdefault(f["sigma"], f)
    used = sorted(by_sigma.values(), key=lambda f: f["sigma"], reverse=True)
    selection_wanted = 0.0 if sep.selection_sigma is None else canonical_sigma(sep.selection_sigma)
    selection = min(used[::-1], key=lambda f: log_distance(f["sigma"], selection_wanted))
    score_model = LevelScore((f["sigma"], load(f["dir"])) for f in used)
    record = {
        "prior_sigma_per_level": [f["sigma"] for f in used], "prior_dir_per_level": [f["dir"] for f in used],
        "prior_grid_per_level": [f["grid"] for f in used],
        "selection_prior_sigma": selection["sigma"], "selection_prior_dir": selection["dir"],
    }
    return score_model, load(selection["dir"]), record


def latent_separator(config, sources, alpha):
    """(the sampler over the run's LQ-VAE latent priors, its selection, record)."""
    if config.model.name != "lqvae":
        raise ConfigError(f"separation.algorithm=latent needs the LQ-VAE family (model.name=lqvae, e.g. "
                          f"EXPERIMENT=toy_lqvae); {config.experiment} has {config.model.name!r}")
    directory = prior_dir(config, 0.0)
    if not is_done(directory):
        raise no_prior_error(config)
    prior = load_prior(directory, list(config.data.sources), to_dict(config.model)).prior
    sep = config.separation
    window = pair_window(sep.latent_window, sources, list(config.data.sources))
    sep = OmegaConf.merge(sep, {"latent_window": window})  # a copy: the user's config keeps the mapping
    indices = [list(config.data.sources).index(s) for s in sources]
    separator = SAMPLERS[sep.algorithm].build(prior, alpha, sep, indices, sep.length or config.data.eval_length)
    latent = {"sigma": sep.latent_sigma, "likelihood": sep.latent_likelihood, "top_k": sep.latent_top_k,
              "search": sep.latent_search, "beam": sep.latent_beam, "rejection_alpha": sep.latent_rejection_alpha,
              "target": sep.latent_target, "temperature": sep.latent_temperature, "overlap": sep.latent_overlap,
              "window": window, "contrast": sep.latent_contrast}
    if sep.latent_sigma == "auto":
        from experiments.latent_sigma import calibrate_latent_sigma

        latent["sigma"], table = calibrate_latent_sigma(config, separator, sources)
        latent["sigma_auto"] = {str(sigma): value for sigma, value in table.items()}
    record = {"prior_dir_per_level": [str(directory)], "selection_prior_dir": str(directory), "latent": latent}
    return separator, separator.score_model, record


def pair_window(window, sources, known):
    """separation.latent_window for these sources: an int or None as given, or, from a mapping of source lists
    ("guitar,bass", in any order) to windows, this list's entry (None, the whole context, where none is)."""
    if not OmegaConf.is_dict(window) and not isinstance(window, dict):
        return window
    for key in window:
        names = [name.strip() for name in str(key).split(",")]
        unknown = [name for name in names if name not in known]
        if unknown or len(names) < 2:
            raise ConfigError(f"separation.latent_window key {key!r} must list two or more of the run's sources "
                              f"{known}, comma-separated (e.g. 'guitar,bass')")
        if sorted(names) == sorted(sources):
            return window[key]
    return None


def variational_posterior(config, sources, alpha):
    """(the trained posterior module, record); refused when it was trained for another mixing."""
    from experiments.train_posterior import load_posterior

    module, record = load_posterior(config, sources, config.separation.posterior)
    if not torch.allclose(module.alpha.cpu(), torch.as_tensor(alpha, dtype=torch.float32)):
        raise ConfigError(f"the posterior in {record['posterior_dir']} was trained on mixtures with weights "
                          f"{module.alpha.tolist()}, not the {alpha.tolist()} asked here (separation.mixing)")
    return module, record


def variational_separator(config, sources, alpha):
    """(the sampler of the trained posterior, its selection prior, record)."""
    module, posterior = variational_posterior(config, sources, alpha)
    separator = SAMPLERS[config.separation.algorithm].build(module, alpha, config.separation)
    record = {"prior_dir_per_level": [posterior["prior_dir"]], "selection_prior_dir": posterior["prior_dir"],
              "selection_prior_sigma": posterior["prior_sigma"], "posterior": posterior}
    return separator, module.prior, record


def template_separator(config, sources, alpha):
    """(the stationary-Gaussian control, its model as the selection prior, record): each class's power spectrum
    from the run's solo training crops of ``sources``; no trained prior is needed."""
    from lightning_modules.samplers.spectral_template import SpectralTemplate, class_power_spectra

    sep = config.separation
    try:
        check_window(sep.template_fft, "separation.template_fft", off_allowed=False)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if sep.template_batches < 1:
        raise ConfigError(f"separation.template_batches must be >= 1, got {sep.template_batches}")
    data = OmegaConf.merge(config.data, {"sources": sources})
    datamodule = build_datamodule(data, seed=config.seed, output_root=config.output_root)
    datamodule.setup("fit")  # a bad dataset root stops here
    spectra = class_power_spectra(datamodule.train_dataloader(), sep.template_fft, sep.template_batches)
    template = SpectralTemplate(spectra, sep.template_fft)
    separator = SAMPLERS[sep.algorithm].build(template, alpha, sep)
    record = {"template": {"n_fft": sep.template_fft, "batches": sep.template_batches, "split": "train",
                           "crop_length": data.crop_length, "batch_size": data.batch_size}}
    return separator, template, record


def build_separator(config):
    """(separator, selection prior, sources, record): the record says which prior directory serves each
    level and the selection, and which mixing is used (and why). The separation length is checked here."""
    entry = check_algorithm(config)
    sep, sources = config.separation, separation_sources(config)
    alpha, mixing = resolve_mixing(config, len(sources))
    if entry.needs != "score":  # their own models, no noise levels
        builders = {"latent": latent_separator, "posterior": variational_separator, "data": template_separator}
        build = builders[entry.needs]
        separator, selection, record = build(config, sources, alpha)
        return separator, selection, sources, record | {"mixing": mixing, "selection": selection_kind(selection)}
    if config.model.name == "lqvae":  # refused before looking for noise levels this family never has
        raise ConfigError(f"the LQ-VAE family's priors score discrete codes: no density gradient for "
                          f"{sep.algorithm}; separate with separation.algorithm=latent")
    levels = entry.levels(sep) if entry.levels else None
    load = PriorLoader(config, sources)
    if is_noise_conditional(to_dict(config.model)):
        sigmas = [level.sigma for level in levels] if levels else [sep.diffusion_sigma_min]
        score_model, selection, record = noise_conditional_priors(config, load, sigmas)
    elif levels is None:
        score_model, selection, record = diffusion_priors(config, load)
    else:
        score_model, selection, record = langevin_priors(config, load, levels)
    check_length(score_model, sep.length or config.data.eval_length)
    separator = entry.build(score_model, alpha, derived_by_index(sep, sources, config.data.sources), levels)
    if sep.init == "variational":
        from lightning_modules.samplers.variational import VariationalInit

        module, record["init_posterior"] = variational_posterior(config, sources, alpha)
        separator.initializer = VariationalInit(module)
    return separator, selection, sources, record | {"mixing": mixing, "selection": selection_kind(selection)}


def derived_by_index(sep, sources, config_sources):
    """The settings with ``diffusion_dirac_derived`` given as a source name turned into that source's index."""
    derived = sep.get("diffusion_dirac_derived", "last")
    if derived in ("last", "rotate"):
        return sep
    if derived not in sources:
        if derived in config_sources:  # a preset's choice for a set it does not separate now (SOURCES=sine,saw)
            log.warning("separation.diffusion_dirac_derived=%s is not separated here (%s): deriving the last source",
                        derived, sources)
            return OmegaConf.merge(sep, {"diffusion_dirac_derived": "last"})
        raise ConfigError(f"separation.diffusion_dirac_derived={derived!r} is not one of the separated sources "
                          f"{sources}; name one of them, or use last or rotate")
    return OmegaConf.merge(sep, {"diffusion_dirac_derived": sources.index(derived)})


def check_length(score_model, length):
    multiple = getattr(score_model, "length_multiple", 1)
    if length % multiple:
        raise ConfigError(f"separation.length {length} must be a multiple of {multiple} for these priors")


def output_name(config, sources):
    """separation.name, or the algorithm and sources, plus a posterior's name when it is not the default one (so
    the separations of two posteriors of the same sources, e.g. two training seeds, do not share a folder)."""
    from experiments.train_posterior import posterior_name

    sep = config.separation
    if sep.name:
        return sep.name
    default = "-".join(sources)
    uses_posterior = sep.algorithm == "variational" or sep.init == "variational"
    posterior = posterior_name(config, sources, sep.posterior) if uses_posterior else default
    suffix = (f"_{posterior}" if posterior != default else "") + ("_val" if sep.split == "val" else "")
    return f"{sep.algorithm}_{default}{suffix}"


def run_separation(config):
    """Separate the first ``separation.n_test`` test mixtures of the run's dataset; returns (results, out_dir)."""
    sep = config.separation
    separator, selection_prior, sources, record = build_separator(config)
    length = sep.length or config.data.eval_length
    mixing = record["mixing"]
    if mixing["kind"] != dataset_mixing(config.data.name):
        log.warning("the %s test mixtures are the %s of their sources; separating them as %s (%s)",
                    config.data.name, dataset_mixing(config.data.name), mixing["kind"], mixing["from"])
    if sep.split not in ("test", "val"):
        raise ConfigError(f"separation.split must be 'test' or 'val', got {sep.split!r}")
    data = OmegaConf.merge(config.data, {"sources": sources, "eval_length": length, "eval_batch_size": sep.batch_size})
    if sep.split == "val" and sep.n_test is not None:
        data.n_val = sep.n_test  # the first n_test validation mixtures, as n_test caps the test set
    out_dir = experiment_dir(config) / "separation" / output_name(config, sources)
    rate = config.data.sample_rate
    module = SeparationModule(separator, sources, sep.algorithm, sep.n_chains, selection_prior, seed=sep.seed,
                              sample_rate=rate, museval=sep.museval, protocol=sep.protocol,
                              window=round(sep.window_seconds * rate), hop=round(sep.hop_seconds * rate),
                              silence_threshold=config.data.silence_threshold, mixing=mixing,
                              mixture_consistency=sep.mixture_consistency, wiener_fft=sep.wiener_fft)
    report = SeparationReport(out_dir, rate, to_dict(config) | record, sep.write_wavs, sep.n_audio_examples)
    datamodule = build_datamodule(data, seed=config.seed, n_test=sep.n_test, output_root=config.output_root)
    datamodule.test_split = sep.split
    datamodule.setup("test")  # a bad dataset root stops here, before anything is written
    results = run_test_loop(config, module, datamodule, out_dir, "separation", [report])
    log.info("separation written to %s", out_dir)
    return results, out_dir
