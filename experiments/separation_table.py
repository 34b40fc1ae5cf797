"""The separation league table: every trained family and sampler on the same fixed toy test mixtures.

    python -m experiments.separation_table [preset=default] [output_root=runs] [entries=a,b] [key=value ...]

The fixed set is the first ``separation.n_test`` (32) toy test mixtures of ``separation.length`` (4096)
samples: toy test example i does not depend on the run seed, and a source subset (sine + square) keeps
the waveforms it has in the 4-source mixture. Each entry is one (family, sampler) run through the same
separation test loop as ``make separate-toy`` (its own folder under ``<run>/separation/table_*``); an
entry whose priors are not trained is listed as skipped, with the command that trains them. The key=value
overrides apply to every entry (e.g. ``separation.n_test=4`` for a quick look); ``sets=all,sine-square``
picks the mixture sets, ``reuse=1`` takes an entry's finished separation folder instead of rerunning it (``reuse=only``: and runs
nothing new). Writes, under
``<output_root>/separation_table/``: table.csv, table.md, table.png, table.json (with every entry's
resolved overrides and output folder).
"""
import json
import logging
import sys
from pathlib import Path

from datamodules.atomic_io import atomic_write, atomic_write_text, file_sha256
from experiments.config import ConfigError, load_config

log = logging.getLogger(__name__)

FIXED_SET = ["separation.n_test=32", "separation.length=4096", "separation.n_chains=4", "separation.seed=0"]
# (entry name, experiment, overrides). BASIS runs 10 levels x 20 steps (paper 004: x 100) with delta
# scaled so eta_L x steps is the paper's; the flow takes its nearest fine-tuned levels.
ENTRIES = {
    # Two chains, not four: the pair refinement makes a chain ~2.3x the cost, and the score rows must fit 30 minutes.
    "diffusion-score": ("toy_score", ["separation.algorithm=diffusion", "separation.n_chains=2"]),
    "basis-score": ("toy_score", ["separation.algorithm=basis", "separation.steps_per_level=20",
                                  "separation.delta=1e-4"]),
    # A documented subset: the first 8 of the 32 mixtures (the table's n column), as 32 take about 20 min per set
    # on 2 CPU cores. delta stays at paper 004's 2e-5: on the first 8 validation mixtures (four sources) 5e-5 sent
    # some chains to infinity (one sample -26.7 dB, against -6.8 at 2e-5) and 1e-4 every chain.
    "basis-flow": ("toy_flow", ["separation.algorithm=basis", "separation.steps_per_level=20",
                                "separation.delta=2e-5", "separation.prior_levels=nearest",
                                "separation.batch_size=8", "separation.n_test=8"]),
    "diffusion-flow": ("toy_flow", ["separation.algorithm=diffusion", "separation.batch_size=8"]),
    # Paper 002: the exact latent posterior (two sources: all K^2 pairs; four: toy_lqvae's beam), 16 candidates.
    "latent-lqvae": ("toy_lqvae", ["separation.algorithm=latent", "separation.n_chains=16", "separation.batch_size=8"]),
    # The same candidates refiltered from the mixture's STFT (a Wiener post-filter, window 4096 = the whole mixture):
    # validation, selected of 4: four sources -0.08 -> +6.44 dB (2048: +6.03), sine + square +10.92 -> +18.00.
    "latent-lqvae-wiener": ("toy_lqvae", ["separation.algorithm=latent", "separation.n_chains=16",
                                          "separation.batch_size=8", "separation.wiener_fft=4096"]),
    # Proposal 000: the amortised posterior of make train-posterior (its mean and its samples), and BASIS
    # over the fine-tuned levels 0.077 -> 0.01 (20 steps each) started at 2 of its samples (CPU time).
    "variational-flow": ("toy_flow", ["separation.algorithm=variational", "separation.batch_size=8"]),
    # The same posterior trained against the score priors (make train-posterior EXPERIMENT=toy_score), and the
    # hybrid: its samples plus noise at the default sampler's sigma_max 1.0 (validation, four sources: +10.0 dB
    # against -4.4 from sigma 0.5), refined by the default diffusion sampler (2 chains, CPU time).
    "variational-score": ("toy_score", ["separation.algorithm=variational", "separation.batch_size=8"]),
    "diffusion-score-from-variational": ("toy_score", [
        "separation.algorithm=diffusion", "separation.init=variational", "separation.n_chains=2"]),
    # The control that needs no trained prior: the posterior mean under stationary Gaussian priors, each class's
    # power spectrum from its solo training crops (one estimate per mixture, so one chain).
    "template": ("toy_flow", ["separation.algorithm=template", "separation.n_chains=1", "separation.batch_size=8"]),
    "basis-flow-from-variational": ("toy_flow", [
        "separation.algorithm=basis", "separation.init=variational", "separation.n_chains=2", "separation.levels=3",
        "separation.sigma_max=0.077", "separation.sigma_min=0.01", "separation.steps_per_level=20",
        "separation.delta=1e-4", "separation.prior_levels=nearest", "separation.batch_size=8"]),
}
DEFAULT_ENTRIES = ["variational-flow", "latent-lqvae", "diffusion-score", "basis-score", "basis-flow"]
MIXTURES = {"4 sources": None, "sine + square": "sine,square"}
SET_KEYS = {"all": "4 sources", "sine-square": "sine + square"}
# (method key, with a = the algorithm and c = the chain count; label)
VARIANTS = (("{a}", "one sample"), ("{a}_mean", "posterior mean"), ("{a}_selected_of_{c}", "selected of C"),
            ("{a}_consistent_of_{c}", "consistent of C"), ("{a}_oracle_of_{c}", "oracle of C"))


def parse(argv):
    special = {"preset": "default", "output_root": "runs", "entries": ",".join(DEFAULT_ENTRIES),
               "sets": ",".join(SET_KEYS), "reuse": "0"}
    overrides = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"arguments look like key=value; got {arg!r}")
        if key in special:
            special[key] = value
        else:
            overrides.append(arg)
    entries = [e for e in special["entries"].split(",") if e]
    unknown = [e for e in entries if e not in ENTRIES]
    if unknown:
        raise ConfigError(f"unknown table entries {unknown}; choose from {list(ENTRIES)}")
    unknown_sets = [k for k in special["sets"].split(",") if k not in SET_KEYS]
    if unknown_sets:
        raise ConfigError(f"unknown sets {unknown_sets}; choose from {list(SET_KEYS)}")
    return special, entries, overrides


def finished_results(out_dir, config):
    """A finished earlier run of the same entry (the same resolved separation settings), or None."""
    from experiments.config import to_dict

    summary = Path(out_dir) / "summary.json"
    if not summary.is_file():
        return None
    from dataclasses import asdict

    from experiments.config import SeparationConfig

    results = json.loads(summary.read_text())
    stored = (results.get("config") or {}).get("separation")
    if stored is None:
        return None
    # An option missing from an older run did not exist yet: that run had its default behaviour.
    stored = {**asdict(SeparationConfig()), **stored}
    if stored != to_dict(config.separation):
        return None
    # A run that used a trained posterior is reused only with that very posterior (older runs did not record it).
    # Its record replaces the config's posterior section; another run's "posterior" is that section.
    for key in ("posterior", "init_posterior"):
        used = results["config"].get(key) or {}
        if "posterior_dir" not in used:
            continue
        checkpoint = Path(used["posterior_dir"]) / "last.ckpt"
        if not (checkpoint.is_file() and used.get("posterior_sha256") == file_sha256(checkpoint)):
            return None
    return results


def entry_overrides(entry, sources, special, overrides):
    experiment, own = ENTRIES[entry]
    subset = [f"separation.sources=[{sources}]"] if sources else []
    name = f"separation.name=table_{entry}_{'-'.join(sources.split(',')) if sources else 'all'}"
    return experiment, [f"output_root={special['output_root']}", *FIXED_SET, *own, *subset, name, *overrides]


def run_entry(entry, sources, special, overrides):
    """The entry's separation results, or a {"skipped": reason} dict when its priors are not trained."""
    from experiments.separate import run_separation

    experiment, entry_args = entry_overrides(entry, sources, special, overrides)
    config = load_config(experiment, special["preset"], entry_args)
    if special["reuse"] not in ("", "0", "false"):
        from experiments.run_layout import experiment_dir
        from experiments.separate import output_name, separation_sources

        out_dir = experiment_dir(config) / "separation" / output_name(config, separation_sources(config))
        results = finished_results(out_dir, config)
        if results is not None:
            log.info("%s: reusing the finished run in %s", entry, out_dir)
            return {"results": results, "out_dir": str(out_dir), "overrides": entry_args,
                    "experiment": experiment, "reused": True}
        if special["reuse"] == "only":
            return {"skipped": "not run here (reuse=only and no finished run)", "overrides": entry_args}
    try:
        results, out_dir = run_separation(config)
    except FileNotFoundError as error:
        log.warning("%s skipped: %s", entry, error)
        return {"skipped": str(error).split(";")[0], "overrides": entry_args}
    return {"results": results, "out_dir": str(out_dir), "overrides": entry_args, "experiment": experiment}


def table_rows(outcomes):
    """One row per (mixtures, method, variant); Average once per mixture set and count (every entry scoring the
    first n mixtures scores the same; a subset entry gets Average on its subset)."""
    rows = []
    for mixtures, entries in outcomes.items():
        averages = {}
        for outcome in entries.values():
            if "results" in outcome:
                average = outcome["results"]["summary"]["average"]
                averages.setdefault(average.get("count"), average)
        for i, (count, average) in enumerate(sorted(averages.items(), key=lambda item: -(item[0] or 0))):
            rows.append(make_row(mixtures, "average", "" if i == 0 else f"the first {count}", average, None))
        for name, outcome in entries.items():
            if "results" not in outcome:
                rows.append({"mixtures": mixtures, "method": name, "variant": "skipped: " + outcome["skipped"]})
                continue
            results = outcome["results"]
            for pattern, variant in VARIANTS:
                key = pattern.format(a=results["algorithm"], c=results["n_chains"])
                if key in results["summary"]:
                    per_second = results.get("seconds_per_audio_second") if pattern == "{a}" else None
                    rows.append(make_row(mixtures, name, variant, results["summary"][key], per_second))
    return rows


def make_row(mixtures, method, variant, stats, seconds_per_audio_second):
    return {"mixtures": mixtures, "method": method, "variant": variant or "-", "count": stats.get("count"),
            "si_sdr": stats.get("si_sdr"), "si_sdri": stats.get("si_sdri"), "sdr": stats.get("sdr"),
            "seconds_per_audio_second": seconds_per_audio_second}


def fmt(value, digits=2):
    return "" if value is None else f"{value:.{digits}f}"


def markdown(rows, preset):
    lines = [f"# Separation league table (preset {preset})", "",
             "The first 32 toy test mixtures of 4096 samples (mean mixing; n: the mixtures a row scored, fewer for a "
             "documented subset), C = 4 chains each (diffusion-score and "
             "diffusion-score-from-variational: C = 2; latent-lqvae: C = 16 candidates; template: one estimate); means "
             "over mixtures, dB. "
             "posterior mean: the variational posterior's E_q[s] (no chain).",
             "selected of C: the chain the method's own prior ranks highest (log-likelihood for flows, the denoising "
             "score for score priors); oracle of C: the chain with the best mean SI-SDR against the references "
             "(an upper bound, the only rows that see them). Wall time: seconds per second of mixture audio "
             "(all C chains), on the machine that ran it.", "",
             "| mixtures | method | variant | n | SI-SDR | SI-SDRi | SDR (v4) | s per s of audio |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['mixtures']} | {row['method']} | {row['variant']} | {row.get('count') or ''} | "
                     f"{fmt(row.get('si_sdr'))} | "
                     f"{fmt(row.get('si_sdri'))} | {fmt(row.get('sdr'))} | {fmt(row.get('seconds_per_audio_second'), 1)} |")
    return "\n".join(lines) + "\n"


def plot(rows, stream):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r["mixtures"] for r in rows))
    most = max(sum(r["mixtures"] == mixtures for r in rows) for mixtures in sets)
    # A bar per row, tall enough for its one-line label.
    fig, axes = plt.subplots(1, len(sets), figsize=(7 * len(sets), max(4.0, 1.0 + 0.22 * most)), squeeze=False)
    for ax, mixtures in zip(axes[0], sets):
        scored = [r for r in rows if r["mixtures"] == mixtures and r.get("si_sdri") is not None]
        labels = [r["method"] if r["variant"] == "-" else f"{r['method']}, {r['variant']}" for r in scored]
        values = [r["si_sdri"] for r in scored]
        ax.barh(range(len(values)), values, color=["C1" if "oracle" in lb else "C0" for lb in labels])
        ax.set_yticks(range(len(values)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0, color="k", linewidth=0.8)
        ax.set_xlabel("SI-SDRi (dB)")
        ax.set_title(mixtures)
    fig.tight_layout()
    fig.savefig(stream, format="png", dpi=110)
    plt.close(fig)


def write_table(rows, outcomes, out_dir, preset):
    import csv

    out_dir = Path(out_dir)
    columns = ["mixtures", "method", "variant", "count", "si_sdr", "si_sdri", "sdr", "seconds_per_audio_second"]

    def write_csv(stream):
        writer = csv.DictWriter(stream, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    atomic_write(out_dir / "table.csv", write_csv)
    atomic_write_text(out_dir / "table.md", markdown(rows, preset))
    atomic_write(out_dir / "table.png", lambda stream: plot(rows, stream), binary=True)
    record = {mixtures: {name: {k: v for k, v in o.items() if k != "results"} for name, o in entries.items()}
              for mixtures, entries in outcomes.items()}
    atomic_write_text(out_dir / "table.json", json.dumps({"preset": preset, "rows": rows, "entries": record}, indent=2))


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        special, entries, overrides = parse(sys.argv[1:] if argv is None else argv)
        chosen = [SET_KEYS[k] for k in special["sets"].split(",")]
        outcomes = {mixtures: {e: run_entry(e, sources, special, overrides) for e in entries}
                    for mixtures, sources in MIXTURES.items() if mixtures in chosen}
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = table_rows(outcomes)
    out_dir = Path(special["output_root"]) / "separation_table"
    write_table(rows, outcomes, out_dir, special["preset"])
    print((out_dir / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
