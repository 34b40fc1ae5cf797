"""Choosing a sampler's settings on validation mixtures, never the test set (``make tune-sampler``).

    python -m experiments.tune_sampler [experiment=toy_score] [preset=default] [candidates=a,b,...]
                                       [sets=all,sine-square] [key=value ...]

Each candidate is a named set of ``separation.*`` overrides (CANDIDATES below: today's defaults, ISDM's
settings, and one change at a time from them). Every candidate separates the same first ``separation.n_test``
(32) validation mixtures of ``separation.length`` (4096) samples with one chain, through the same test loop as
``make separate`` (``separation.split=val``), and the search table ranks them by the mean SI-SDRi of that one
sample on each set. Writes <run>/sampler_search/search.{json,md}; the winner is then set by hand as the
experiment's default, with the table in the docs.
"""
import json
import logging
import sys
from pathlib import Path

from datamodules.atomic_io import atomic_write_text
from experiments.config import ConfigError, load_config

log = logging.getLogger(__name__)

VALIDATION_SET = ["separation.split=val", "separation.n_test=32", "separation.length=4096", "separation.n_chains=1",
                  "separation.seed=0", "separation.museval=false", "separation.write_wavs=false",
                  "separation.algorithm=diffusion"]
ISDM = ["separation.diffusion_solver=euler", "separation.diffusion_steps=150", "separation.diffusion_churn=40",
        "separation.diffusion_corrections=2", "separation.diffusion_constraint=dirac",
        "separation.diffusion_sigma_max=1.0", "separation.diffusion_relabel_sigmas=[]",
        "separation.diffusion_dirac_derived=last", "separation.diffusion_pair_sweeps=0"]
PROJECTED = ISDM + ["separation.diffusion_constraint=projected"]
RELABEL = "separation.diffusion_relabel_sigmas=[0.5,0.3,0.2,0.1,0.05]"
CANDIDATES = {
    "default": [],
    "isdm": ISDM,
    "dirac": ["separation.diffusion_constraint=dirac"],
    "gaussian-0.75": ["separation.diffusion_constraint=gaussian", "separation.diffusion_gamma_scale=0.75"],
    "heun-100": ["separation.diffusion_steps=100"],
    "churn-20": ["separation.diffusion_churn=20"],
    "corrections-2": ["separation.diffusion_corrections=2"],
    "sigma-max-0.5": ["separation.diffusion_sigma_max=0.5"],
    "sigma-max-2": ["separation.diffusion_sigma_max=2.0"],
    "init-mixture": ["separation.diffusion_init=mixture"],
    "no-pairs": ["separation.diffusion_pair_sweeps=0"],
    "isdm-gaussian": ISDM + ["separation.diffusion_constraint=gaussian"],
    "isdm-heun-50": ISDM + ["separation.diffusion_solver=heun", "separation.diffusion_steps=50"],
    "dirac-scaled": ["separation.diffusion_constraint=dirac", "separation.diffusion_dirac_last_sigma=scaled"],
    "isdm-scaled": ISDM + ["separation.diffusion_dirac_last_sigma=scaled"],
    "isdm-sigma-max-3": ISDM + ["separation.diffusion_sigma_max=3.0"],
    "isdm-projected": PROJECTED,
    "projected-sigma-max-3": PROJECTED + ["separation.diffusion_sigma_max=3.0"],
    "isdm-gaussian-0.5": ISDM + ["separation.diffusion_constraint=gaussian", "separation.diffusion_gamma_scale=0.5"],
    "projected-corrections-5": PROJECTED + ["separation.diffusion_corrections=5"],
    "projected-relabel": PROJECTED + [RELABEL],
    "isdm-relabel": ISDM + [RELABEL],
    "relabel-square": ISDM + [RELABEL, "separation.diffusion_dirac_derived=square"],
    "relabel-square-pairs-3x50": ISDM + [RELABEL, "separation.diffusion_dirac_derived=square",
                                         "separation.diffusion_steps=100", "separation.diffusion_corrections=1",
                                         "separation.diffusion_pair_sweeps=3", "separation.diffusion_pair_steps=50",
                                         "separation.diffusion_pair_corrections=0"],
    "projected-relabel-dense": PROJECTED + ["separation.diffusion_relabel_sigmas=[1.0,0.7,0.5,0.4,0.3,0.2,0.15,0.1,"
                                            "0.07,0.05,0.03]"],
}
SETS = {"all": None, "sine-square": "sine,square"}


def parse(argv):
    special = {"experiment": "toy_score", "preset": "default", "candidates": ",".join(CANDIDATES),
               "sets": ",".join(SETS)}
    overrides = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"arguments look like key=value; got {arg!r}")
        (special.__setitem__(key, value) if key in special else overrides.append(arg))
    unknown = [c for c in special["candidates"].split(",") if c not in CANDIDATES]
    unknown += [s for s in special["sets"].split(",") if s not in SETS]
    if unknown:
        raise ConfigError(f"unknown candidate(s) or set(s) {unknown}; candidates: {list(CANDIDATES)}, sets: {list(SETS)}")
    return special, overrides


def one_sample_si_sdri(summary, algorithm="diffusion"):
    return summary["summary"][algorithm]["si_sdri"]


def main(argv=None):
    from experiments.separate import run_separation

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        special, overrides = parse(sys.argv[1:] if argv is None else argv)
        rows, out_dir, config = [], None, None
        for name in special["candidates"].split(","):
            row = {"candidate": name, "overrides": CANDIDATES[name]}
            for set_key in special["sets"].split(","):
                sources = [f"separation.sources=[{SETS[set_key]}]"] if SETS[set_key] else []
                args = VALIDATION_SET + CANDIDATES[name] + sources + overrides + [
                    f"separation.name=search_{name}_{set_key}"]
                config = load_config(special["experiment"], special["preset"], args)
                results, sep_dir = run_separation(config)
                summary = json.loads((sep_dir / "summary.json").read_text())
                row[set_key] = one_sample_si_sdri(summary)
                row[f"{set_key}_seconds_per_audio_second"] = summary["seconds_per_audio_second"]
                out_dir = sep_dir.parent.parent / "sampler_search"
            rows.append(row)
            log.info("candidate %s: %s", name, {k: row[k] for k in special["sets"].split(",")})
        write_search(out_dir, rows, special["sets"].split(","), config.separation.n_test, config.separation.length)
        print((out_dir / "search.md").read_text())
        return 0
    except (ConfigError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def write_search(out_dir, rows, sets, n_mixtures=32, length=4096):
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "search.json", json.dumps(rows, indent=2))
    lines = [f"Validation SI-SDRi (dB, one sample per mixture, first {n_mixtures} validation mixtures of {length} "
             "samples; s/s: wall seconds per second of mixture)", "",
             "| candidate | " + " | ".join(f"{s} | s/s" for s in sets) + " | overrides |", "|---" * (2 * len(sets) + 2) + "|"]
    for row in sorted(rows, key=lambda r: -sum(r[s] for s in sets)):
        cells = " | ".join(f"{row[s]:+.2f} | {row[s + '_seconds_per_audio_second']:.2f}" for s in sets)
        lines.append(f"| {row['candidate']} | {cells} | {' '.join(o.split('.', 1)[1] for o in row['overrides'])} |")
    atomic_write_text(out_dir / "search.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
