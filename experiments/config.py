"""Typed experiment configuration: schema <- experiment default <- presets <- command-line overrides.

The schema is an OmegaConf structured config, so a misspelled key or a wrongly typed value fails
loudly with the key's name instead of being silently ignored.
"""
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from datamodules.atomic_io import atomic_write_text

EXPERIMENTS_DIR = Path(__file__).resolve().parent
PRESETS_DIR = EXPERIMENTS_DIR / "presets"


@dataclass
class DataConfig:
    name: str = "toy"
    sources: List[str] = field(default_factory=lambda: ["sine", "square", "saw", "triangle"])
    sample_rate: int = 16000
    crop_length: int = 16384
    eval_length: int = 16384
    batch_size: int = 5
    eval_batch_size: int = 16
    n_train: int = 5000
    n_val: int = 500
    n_test: Optional[int] = 1500  # musdb18 / slakh2100: at most this many evaluation frames, None = all (n_val likewise)
    num_workers: int = 0
    # musdb18 and slakh2100 only (datamodules/musdb18.py, slakh2100.py):
    root: Optional[str] = None  # None = $MUSDB_ROOT or $SLAKH_ROOT
    is_wav: Optional[bool] = None  # musdb18: True = MUSDB18-HQ wav folders, False = .stem.mp4, None = detect
    cache_dir: Optional[str] = None  # decoded stems as .npy memory maps; None = <output_root>/stem_cache
    frames_per_song: int = 150  # random training frames per song and epoch
    silence_threshold: float = 1.5e-5  # drop a frame when ||x_k||_2 / length < this for any source k; 0 = keep all
    max_tracks: Optional[int] = None  # only the first n tracks of each split where every source sounds (CPU subsets)


@dataclass
class ModelConfig:
    """The union of every prior family's options; unset (None) ones take the family's defaults
    (FlowConfig in lightning_modules/nn/flowavenet.py, WaveNetConfig in lightning_modules/nn/wavenet.py,
    ScoreConfig in lightning_modules/nn/score_prior.py,
    LatentPriorConfig in lightning_modules/nn/latent_prior.py)."""
    name: str = "flowavenet"
    n_blocks: Optional[int] = None
    n_flows: Optional[int] = None
    n_layers: Optional[int] = None
    width: Optional[int] = None
    kernel_size: Optional[int] = None
    n_classes: Optional[int] = None
    likelihood: Optional[str] = None
    smoothing_sigma: Optional[float] = None
    # score (ScoreConfig in lightning_modules/nn/score_prior.py):
    net: Optional[str] = None  # dilated | unet
    unet_widths: Optional[List[int]] = None
    unet_factors: Optional[List[int]] = None
    unet_blocks: Optional[int] = None
    unet_attention_levels: Optional[int] = None
    squeeze: Optional[int] = None
    dilation_cycle: Optional[int] = None
    embed_dim: Optional[int] = None
    sigma_min: Optional[float] = None
    sigma_max: Optional[float] = None
    sigma_sampling: Optional[str] = None
    p_mean: Optional[float] = None
    p_std: Optional[float] = None
    ode_divergence: Optional[str] = None
    ode_tolerance: Optional[float] = None
    ode_probes: Optional[int] = None
    # lqvae (LatentPriorConfig in lightning_modules/nn/latent_prior.py: the LQ-VAE, then the Transformers,
    # which take width, n_layers and these):
    codebook_size: Optional[int] = None
    code_dim: Optional[int] = None
    vq_width: Optional[int] = None
    strides: Optional[List[int]] = None
    res_depth: Optional[int] = None
    dilation_growth: Optional[int] = None
    ema_decay: Optional[float] = None  # lqvae: the codebook's EMA; score: the EMA of the weights
    restart_threshold: Optional[float] = None
    beta: Optional[float] = None
    lin_weight: Optional[float] = None
    lin_mixing: Optional[str] = None  # the dataset's mixing: mean (toy), sum (musdb18, slakh2100 stems)
    lin_sources: Optional[int] = None  # sources mixed per linearisation group: None = len(data.sources), 2 = pairs
    spectral_weight: Optional[float] = None
    fft_sizes: Optional[List[int]] = None
    n_heads: Optional[int] = None
    context: Optional[int] = None
    dropout: Optional[float] = None


@dataclass
class OptimConfig:
    lr: float = 1e-4
    lr_decay: float = 0.6
    lr_decay_times: int = 5
    gradient_clip_val: float = 1.0


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    precision: str = "32-true"
    num_nodes: int = 1
    max_steps: int = 150_000
    val_check_interval: int = 1000
    limit_val_batches: Any = 1.0
    log_every_n_steps: int = 50
    checkpoint_every_n_steps: int = 500
    max_time: Optional[str] = None
    enable_progress_bar: bool = True
    # PRESET=compile: the prior's training objective through torch.compile (docs/speed.md says where it pays)
    compile: bool = False


@dataclass
class FinetuneConfig:
    sigma: Optional[float] = None
    # "paper003": {0.01, 0.027, 0.077, 0.129, 0.359}, each from the noiseless prior.
    # "basis": 10 levels geometric 0.01 -> 1.0, each from its neighbour (serial).
    grid: str = "paper003"
    lr: float = 1e-4
    max_steps: int = 40_000
    patience: int = 5
    val_check_interval: int = 1000


@dataclass
class LQVAEStageConfig:
    """Stage 1 of model.name=lqvae (the LQ-VAE); stage 2 (the Transformers) uses optim and trainer."""
    max_steps: int = 100_000
    lr: float = 3e-4
    lr_decay_times: int = 0
    val_check_interval: int = 1000
    n_test: Optional[int] = None  # test crops of the stage-1 report; None = data.n_test
    crop_length: Optional[int] = None  # stage-1 training crops; None = data.crop_length
    batch_size: Optional[int] = None  # stage-1 batch; None = data.batch_size


@dataclass
class PosteriorConfig:
    """make train-posterior: the amortised posterior q(s | m) trained on the ELBO against the run's frozen
    priors, from mixtures only (lightning_modules/posterior_module.py)."""
    name: Optional[str] = None  # folder <run>/posterior/<name>/; None = the sources joined by "-"
    sources: Optional[List[str]] = None  # the sources of its mixtures (a subset of data.sources); None = all
    prior_sigma: float = 0.0  # the frozen prior: the level fine-tuned at this sigma (0 = noiseless);
    # score priors: the sigma at which their score stands in for the gradient of log p
    prior_levels: str = "exact"  # exact | nearest (the finished level nearest in log-sigma, either layout)
    # Coarse to fine while training, e.g. [0.3,0.1,0.077]: max_steps split into len(list) equal stages, each
    # against the level at its sigma (matched as prior_sigma is; replaces prior_sigma). The finished posterior
    # belongs to the last level, which validation and separation use. None = the one level of prior_sigma.
    prior_sigmas: Optional[List[float]] = None
    # PosteriorNetConfig (lightning_modules/nn/posterior_net.py):
    width: int = 32
    n_layers: int = 10
    kernel_size: int = 3
    distribution: str = "truncated_normal"  # truncated_normal (on [-1, 1], the thesis) | normal
    init_from_average: bool = True  # q's location starts at the Average baseline; the network learns the rest
    init_scale: float = 0.1
    min_scale: float = 1e-3
    gamma: float = 0.05  # std of the mixture likelihood N(m; g(s), gamma^2 I)
    # A source name: the Dirac likelihood instead (lightning_modules/nn/dirac_posterior.py): q models the other
    # sources and this one is what the mixture leaves, so samples sum to m exactly and gamma is unused.
    derived: Optional[str] = None
    warmup_steps: int = 0  # the prior and entropy terms' weight rises linearly from 0 to 1 over these steps
    # Wake-sleep: the first sleep_steps train q on the model's own (sources, mixture) pairs, sources drawn from the
    # priors (sleep_draws per source, sleep_draw_length samples each, None = 2 x the crop; score priors: EDM's
    # stochastic sampler, sleep_sampler_steps levels, churn sleep_churn; flows: the noiseless prior's exact
    # sampler at sleep_temperature), log q(s | m) maximised; the ELBO steps follow.
    sleep_steps: int = 0
    sleep_draws: int = 512
    sleep_draw_length: Optional[int] = None
    sleep_sampler_steps: int = 50
    sleep_churn: float = 40.0
    sleep_temperature: float = 1.0
    lr: float = 1e-3
    lr_decay_times: int = 0  # x0.6 this many times, evenly over max_steps
    max_steps: int = 600
    val_check_interval: int = 100
    n_val: int = 32  # validation mixtures (monitoring only: nothing is selected by them)
    batch_size: Optional[int] = None  # None = data.batch_size
    crop_length: Optional[int] = None  # None = data.crop_length


@dataclass
class CrossLikelihoodConfig:
    # Models to compare: "all" finished noise levels, or an explicit list of sigmas (0 = noiseless).
    sigmas_model: Any = "all"
    # Test-data noise levels of the sigma_data x sigma_model grid; "models" = 0 and every model sigma.
    sigmas_data: Any = "models"
    n_test: Optional[int] = None
    inputs: List[str] = field(default_factory=lambda: ["constant 0", "constant 1", "gaussian std 0.5"])
    n_input_examples: int = 4
    latent_only: bool = False
    noise_seed: int = 0
    # Discrimination report: bits of the PCM the lossless coder (FLAC) codes, for the complexity-corrected
    # score (8, 16 or 24; lightning_modules/metrics/coder_length.py).
    coder_bit_depth: int = 16


@dataclass
class SeparationConfig:
    algorithm: str = "basis"  # basis (paper 004 Alg. 1) | sgld (paper 003 App. 5.1) | diffusion (ISDM, EDM sampler)
    # | latent (paper 002: the LQ-VAE family's exact latent posterior)
    # | variational (the amortised posterior of make train-posterior: its mean and samples)
    # | template (the control: the posterior mean under stationary Gaussian priors, no trained prior needed)
    name: Optional[str] = None  # output folder under separation/; None = <algorithm>_<sources>
    sources: Optional[List[str]] = None  # the sources to separate, a subset of data.sources; None = all
    n_test: Optional[int] = 16  # the first n test mixtures (a fixed subset); None = the whole test set
    split: str = "test"  # test | val: separate the first n_test validation mixtures instead (to choose settings)
    length: Optional[int] = None  # samples per mixture (and per chunk of a user file); None = data.eval_length
    batch_size: int = 1  # mixtures per test batch
    n_chains: int = 4  # posterior samples per mixture, run in parallel
    # None = the dataset's own (datamodules/registry.py MIXING: toy mean, musdb18 and slakh2100 sum);
    # mean | sum, or explicit mixing_weights, override it.
    mixing: Optional[str] = None
    mixing_weights: Optional[List[float]] = None
    levels: int = 10  # BASIS: geometric noise levels sigma_max -> sigma_min
    sigma_max: float = 1.0
    sigma_min: float = 0.01
    steps_per_level: int = 100
    delta: float = 2e-5  # eta_i = delta * sigma_i^2 / sigma_L^2
    # exact: BASIS takes each level from the BASIS grid (make finetune-noise-all GRID=basis), SGLD its
    # sgld_prior_sigma from make finetune-noise (else the BASIS grid); nearest: the finished level nearest in
    # log-sigma from either layout (the algorithm's own grid wins ties). The directories are recorded.
    prior_levels: str = "exact"
    # template (lightning_modules/samplers/spectral_template.py): each class's power spectrum from the first
    # template_batches batches of its solo training crops, windows of template_fft samples (hop / 4)
    template_fft: int = 2048
    template_batches: int = 64
    sgld_steps: int = 1000
    sgld_eta: float = 2e-5
    sgld_gamma: float = 0.01
    sgld_prior_sigma: float = 0.01  # the prior SGLD uses (0 = noiseless)
    selection_sigma: Optional[float] = None  # prior ranking the chains; None = the last level's (diffusion: smallest)
    # diffusion (lightning_modules/samplers/diffusion.py); a likelihood family serves each sigma with its nearest finished level
    diffusion_steps: int = 50  # noise levels of the Karras schedule, sigma_max -> sigma_min (then a last step to 0)
    diffusion_sigma_max: float = 5.0  # the first level; chains start as N(0, sigma_max^2)
    diffusion_sigma_min: float = 1e-3  # the last positive level
    diffusion_rho: float = 7.0  # Karras schedule curvature (EDM eq. 5)
    diffusion_solver: str = "heun"  # heun (2nd order) | euler
    diffusion_churn: float = 0.0  # EDM S_churn: fresh noise added before each step (0 = deterministic ODE)
    # dirac: g(x) = m exactly, the last source derived | projected: g(x) = m by orthogonal projection, no source
    # derived | gaussian: m ~ N(g(x), gamma^2)
    diffusion_constraint: str = "dirac"
    diffusion_gamma_scale: float = 1.0  # gaussian constraint: gamma = gamma_scale * sigma
    diffusion_corrections: int = 0  # ISDM correction steps per level (re-noise and redo)
    # dirac: the score of the derived source at sigma (same, ISDM) or at its own noise level (scaled)
    diffusion_dirac_last_sigma: str = "same"
    # dirac: the source derived from the others, m - sum: last (the last listed) | a source name | rotate (chain c
    # derives the (c+1)-th source from the end, so 4 chains of 4 sources try every choice and the selection picks)
    diffusion_dirac_derived: Any = "last"
    diffusion_init: str = "noise"  # noise | mixture (start from the Average baseline plus noise)
    diffusion_langevin_steps: int = 0  # Langevin steps at sigma_min before the last step to 0
    diffusion_langevin_eta: float = 0.1  # their step size, in units of sigma_min^2
    # Relabel every chain's sources by the priors' best permutation at the first level below each of these
    # sigmas (lightning_modules/samplers/relabel.py; score family only; [] = never)
    diffusion_relabel_sigmas: List[float] = field(default_factory=list)
    # > 2 sources: after the run, this many round-robins of pairwise re-separation (each pair's sum split afresh by
    # two two-source runs, one deriving each source; lightning_modules/samplers/pair_refinement.py; equal weights
    # and a selection score only)
    diffusion_pair_sweeps: int = 0
    diffusion_pair_steps: Optional[int] = None  # the pair runs' schedule length (None: diffusion_steps)
    diffusion_pair_corrections: Optional[int] = None  # their correction steps per level (None: diffusion_corrections)
    # latent (LQ-VAE family, lightning_modules/samplers/latent_posterior.py): the exact per-step posterior over code tuples
    # std of the latent Gaussian likelihood (paper 002: 0.1; its code: 0.4), or auto: the sigma that gives the true
    # code pairs of solo validation crops the highest posterior probability (two sources; experiments/latent_sigma.py)
    latent_sigma: Any = 0.4
    latent_likelihood: str = "gaussian"  # gaussian | delta (only tuples whose quantised sum is the mixture's code)
    # > 2 sources (2 sources: exact K^2): beam (a beam over partial code tuples that sees the mixture,
    # lightning_modules/samplers/latent_beam.py) | topk (each prior's latent_top_k codes, then their joint)
    latent_search: str = "beam"
    # what the tuples' weighted code sums are compared with: quantised (paper 002: B_Q(E(m)), one of K codes per
    # step) | latent (E(m) itself, the encoder's unquantised output: the D numbers the quantiser rounds away)
    latent_target: str = "quantised"
    latent_beam: int = 64  # beam width: partial code tuples kept per source and step
    latent_top_k: Optional[int] = 8  # latent_search=topk: codes per source kept before the joint
    latent_rejection_alpha: float = 0.0  # weight of the time-domain likelihood in the rejection (0 = paper's best)
    # each step drawn from the posterior to the power 1/latent_temperature (1 = paper 002: the posterior itself)
    latent_temperature: float = 1.0
    # codes already drawn that each new window of the Transformers' context is fed first (0: consecutive windows,
    # a window's first codes drawn with no past); mixtures longer than the context only
    latent_overlap: int = 0
    # codes per window: an int, None (the Transformers' whole context), or a mapping from source lists as in
    # separation.sources ("guitar,bass") to windows, the sources not listed keeping the whole context
    latent_window: Any = None
    # lambda >= 0: each source's step prior tilted by lambda times its log-ratio to the pooled prior (the equal
    # mixture of every class prior fed the same past), and a class_ratio choice row; None: off (paper 002)
    latent_contrast: Optional[float] = None
    # project every estimate onto the mixture before scoring (the nearest sources whose weighted sum is m;
    # lightning_modules/separation.py); the chains are ranked before it
    mixture_consistency: bool = False
    # a Wiener post-filter on every estimate before it is scored (window of this many samples; 0 = off): the
    # mixture's STFT shared in proportion to the estimates' power (lightning_modules/samplers/wiener_filter.py);
    # applied before mixture_consistency, the chains ranked before both
    wiener_fft: int = 0
    init_range: float = 1.0  # chains start uniform in [-init_range, init_range]
    # default: each sampler's own start | variational: BASIS/SGLD chains start at a sample of the trained
    # posterior; diffusion chains at that sample plus N(0, diffusion_sigma_max^2)
    init: str = "default"
    posterior: Optional[str] = None  # the posterior (variational, init=variational); None = the sources joined by "-"
    seed: int = 0
    museval: bool = True
    # full: SI-SDR, SI-SDRi, SDR of each whole item; windowed: also the SI-SDRi of recent generative
    # separators over windows (with at most one active source skipped, data.silence_threshold's rule).
    protocol: str = "full"
    window_seconds: float = 4.0  # an item shorter than a window is scored as one window
    hop_seconds: float = 2.0
    write_wavs: bool = True
    n_audio_examples: int = 4  # mixtures logged as audio to W&B
    min_seconds: float = 0.1  # shortest user file accepted


@dataclass
class WandbConfig:
    enabled: bool = True
    project: str = "generative-separation"
    # offline unless the user sets WANDB_MODE=online
    mode: Optional[str] = None


@dataclass
class Config:
    experiment: str = "toy_flow"
    preset: str = "default"
    run_name: str = "default"
    seed: int = 0
    output_root: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    lqvae: LQVAEStageConfig = field(default_factory=LQVAEStageConfig)
    posterior: PosteriorConfig = field(default_factory=PosteriorConfig)
    cross_likelihood: CrossLikelihoodConfig = field(default_factory=CrossLikelihoodConfig)
    separation: SeparationConfig = field(default_factory=SeparationConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


class ConfigError(ValueError):
    pass


def available(folder, suffix=".yaml"):
    return sorted(p.stem for p in Path(folder).glob(f"*{suffix}")) if Path(folder).is_dir() else []


def preset_path(experiment, name):
    for candidate in (EXPERIMENTS_DIR / experiment / f"{name}.yaml", PRESETS_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    choices = sorted(set(available(EXPERIMENTS_DIR / experiment)) | set(available(PRESETS_DIR)))
    raise ConfigError(f"unknown preset {name!r} for experiment {experiment!r}; choose from {choices}")


def load_config(experiment="toy_flow", preset="default", overrides=()):
    """``preset`` may list several, comma-separated (e.g. ``paper,bf16``); later ones win."""
    experiments = [p.name for p in EXPERIMENTS_DIR.iterdir() if (p / "default.yaml").is_file()]
    if experiment not in experiments:
        raise ConfigError(f"unknown experiment {experiment!r}; choose from {sorted(experiments)}")
    names = [name.strip() for name in preset.split(",") if name.strip()]
    layers = [OmegaConf.load(EXPERIMENTS_DIR / experiment / "default.yaml")]
    layers += [OmegaConf.load(preset_path(experiment, n)) for n in names if n != "default"]
    try:
        config = OmegaConf.merge(OmegaConf.structured(Config), *layers, parse_overrides(overrides))
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None)
        message = str(error).splitlines()[0]
        where = f"key '{key}': " if key else ""
        raise ConfigError(f"bad configuration: {where}{message} (the keys are in experiments/config.py)") from None
    config.experiment, config.preset = experiment, ",".join(names) or "default"
    check_request(config)
    return config


def parse_overrides(overrides):
    """key=value overrides; a value that is not valid YAML is named, with its key."""
    parsed = OmegaConf.create()
    for override in overrides:
        try:
            parsed = OmegaConf.merge(parsed, OmegaConf.from_dotlist([override]))
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(f"cannot parse the override {override!r}: {problem}; write lists as "
                              f"key=[a,b] with no empty items, and quote values with spaces") from None
    return parsed


# Names that become one folder of a path under output_root: a single component, no separators, no "..".
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
PATH_NAME_KEYS = ("run_name", "separation.name", "separation.posterior", "posterior.name")
PATH_LIST_KEYS = ("data.sources", "separation.sources", "posterior.sources")
STEP_KEYS = ("trainer.max_steps", "finetune.max_steps", "lqvae.max_steps", "posterior.max_steps")


def check_request(config):
    """What can be checked before any training or separation starts: names that become folders are safe
    single components, the sources asked for are the run's, and every step budget is positive."""
    for key in PATH_NAME_KEYS:
        value = OmegaConf.select(config, key)
        if value is not None:
            check_name(key, value)
    for key in PATH_LIST_KEYS:
        for value in OmegaConf.select(config, key) or []:
            check_name(key, value)
    for key in ("separation.sources", "posterior.sources"):
        wanted = list(OmegaConf.select(config, key) or [])
        unknown = [s for s in wanted if s not in config.data.sources]
        if unknown:
            raise ConfigError(f"{key} must be sources of the run: {unknown} unknown; choose from "
                              f"{list(config.data.sources)}")
    for key in STEP_KEYS:
        steps = OmegaConf.select(config, key)
        if steps <= 0:
            raise ConfigError(f"{key} must be a positive number of steps, got {steps}; a run with no steps "
                              f"would be marked finished untrained")
    if config.posterior.prior_sigmas is not None:  # positive, strictly descending, a step for each
        from lightning_modules.nn.prior_schedule import check_sigmas

        try:
            check_sigmas(list(config.posterior.prior_sigmas), config.posterior.max_steps)
        except ValueError as error:
            raise ConfigError(str(error)) from None


def check_name(key, value):
    value = str(value)
    if not SAFE_NAME.fullmatch(value) or value in (".", ".."):
        raise ConfigError(f"{key}={value!r} names a folder under output_root: use letters, digits, '_', '-', "
                          f"'.' and '+' only (one path component, no '/' and no '..')")


def to_dict(config):
    return OmegaConf.to_container(config, resolve=True)


def save_config(config, path):
    atomic_write_text(path, OmegaConf.to_yaml(config, resolve=True))
