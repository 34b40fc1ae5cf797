"""Command line of the framework; the Makefile targets call this.

    python -m experiments.cli COMMAND [experiment=NAME] [preset=A,B] [sigma=S] [key.sub=value ...]

COMMAND is one of: train, train-lqvae, lqvae-ablation, train-posterior, train-pooled, finetune, finetune-all,
cross-likelihood, compare, separate, separate-file, show-config. ``train`` of an LQ-VAE experiment runs both
stages; ``train-lqvae`` only the first (the LQ-VAE and its report). ``train-pooled`` trains one prior of the
family on every source pooled, then fine-tunes it at ``sigma`` (or over the whole noise grid without one).
``separate-file`` also takes mix=PATH out=DIR [force=1].
"""
import logging
import sys
import warnings

from experiments.config import ConfigError, load_config
from experiments.run_layout import parse_sigma

COMMANDS = ("train", "train-lqvae", "lqvae-ablation", "train-posterior", "train-pooled", "finetune", "finetune-all",
            "cross-likelihood", "compare", "separate", "separate-file", "show-config")
SPECIAL_KEYS = ("experiment", "preset", "sigma", "mix", "out", "force")


def parse_args(argv):
    if not argv or argv[0] not in COMMANDS:
        raise ConfigError(f"first argument must be a command from {list(COMMANDS)}; got {argv[:1]}")
    command, special, overrides = argv[0], {}, []
    for arg in argv[1:]:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"arguments look like key=value; got {arg!r}")
        if key in SPECIAL_KEYS:
            special[key] = value
        else:
            overrides.append(arg)
    return command, special, overrides


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    try:
        command, special, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        config = load_config(special.get("experiment", "toy_flow"), special.get("preset", "default"), overrides)
        sigma = parse_sigma(special["sigma"]) if special.get("sigma", "") != "" else None
        if command == "finetune" and sigma is None:
            raise ConfigError("finetune needs a noise level: make finetune-noise SIGMA=0.077")
        if command == "separate-file" and not (special.get("mix") and special.get("out")):
            raise ConfigError("separate-file needs the mixture and an output folder: make separate MIX=song.wav OUT=dir")
        return run(command, config, sigma, special)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:
        print(f"interrupted: {error}", file=sys.stderr)
        return 130


def run(command, config, sigma, special):
    # Imported here so that configuration errors are reported without loading torch.
    from experiments.cross_likelihood import run_cross_likelihood
    from experiments.train import finetune, finetune_grid, train_noiseless

    if command == "show-config":
        from omegaconf import OmegaConf
        print(OmegaConf.to_yaml(config, resolve=True))
    elif command == "train":
        train_noiseless(config)
    elif command == "train-lqvae":
        from experiments.train_lqvae import train_lqvae

        report = train_lqvae(config) / "report" / "lqvae_report.md"
        print(report.read_text() if report.is_file() else f"stage 1 finished; no report at {report}")
    elif command == "lqvae-ablation":
        from experiments.lqvae_ablation import run_ablation

        print(run_ablation(config).read_text())
    elif command == "train-posterior":
        from experiments.train_posterior import train_posterior

        print(f"posterior written to {train_posterior(config)}")
    elif command == "train-pooled":
        train_noiseless(config, pooled=True)
        if sigma is not None:
            finetune(config, sigma, pooled=True)
        else:
            finetune_grid(config, pooled=True)
    elif command == "finetune":
        finetune(config, sigma)
    elif command == "finetune-all":
        finetune_grid(config)
    elif command == "compare":
        from experiments.compare import run_compare

        out_dir, _ = run_compare(config)
        print((out_dir / "comparison.md").read_text())
    elif command == "separate":
        from experiments.separate import run_separation

        results, out_dir = run_separation(config)
        if results is not None:
            print((out_dir / "summary.md").read_text())
    elif command == "separate-file":
        from experiments.separate_file import separate_file

        force = special.get("force", "") not in ("", "0", "false", "no")
        out_dir, info = separate_file(config, special["mix"], special["out"], force=force)
        print(f"wrote {', '.join(s + '.wav' for s in info['sources'])} to {out_dir}")
    elif command == "cross-likelihood":
        results, out_dir = run_cross_likelihood(config)
        if results is not None:
            print((out_dir / "summary.md").read_text() if (out_dir / "summary.md").is_file() else results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
