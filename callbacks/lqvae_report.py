"""The LQ-VAE's stage-1 report (CSV / JSON / Markdown / W&B): reconstruction SI-SDR per source class on the
test set, code usage (perplexity, codes used, dead codes) and the held-out linearisation error.

Pure functions over the plain ``results`` dict of LQVAEModule's test loop, plus a thin callback."""
import csv
import json
import math

from callbacks.cross_likelihood_report import _jsonable
from callbacks.results_report import ResultsReport
from datamodules.atomic_io import atomic_write, atomic_write_text

COLUMNS = ("source", "reconstruction_si_sdr_db", "perplexity", "codes_used", "lin_pair", "lin_error",
           "lin_error_relative", "lin_code_agreement")


def rows(results):
    out = []
    for source, pair in zip(results["sources"], results["lin_pairs"]):
        out.append({"source": source, "reconstruction_si_sdr_db": results["si_sdr"][source],
                    "perplexity": results["perplexity"][source], "codes_used": results["codes_used"][source],
                    "lin_pair": pair, "lin_error": results["lin_error"][source],
                    "lin_error_relative": results["lin_error_relative"][source],
                    "lin_code_agreement": results["lin_code_agreement"][source]})
    return out


def fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def lin_formula(size):
    """The linearisation error of groups of ``size`` sources, written out (x1, x2 or x1, ..., xL)."""
    names = ["x1", "x2"] if size == 2 else ["x1", "...", f"x{size}"]
    mix = " + ".join(n if n == "..." else f"w {n}" for n in names)
    codes = " + ".join(n if n == "..." else f"w B_Q(E({n}))" for n in names)
    return f"||B_Q(E({mix})) - B_Q({codes})||^2" + ("" if size == 2 else f" over groups of {size} sources")


def markdown(results):
    lines = [
        f"# LQ-VAE report ({results['count']} test crops per source)",
        "",
        f"hop {results['hop']} samples, {results['codebook_size']} codes, linearisation weight "
        f"{results['lin_weight']:g} ({results['lin_mixing']} mixing)",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(fmt(row[c]) for c in COLUMNS) + " |" for row in rows(results)]
    lines += [
        "",
        f"- Reconstruction SI-SDR: mean {fmt(results['si_sdr_mean'])} dB, worst class "
        f"{fmt(min(results['si_sdr'].values()))} dB.",
        f"- Codebook: perplexity {fmt(results['perplexity_all'])} over all classes, {results['codes_used_all']} of "
        f"{results['codebook_size']} codes used on the test set ({results['dead_codes_all']} unused; "
        f"{results['dead_codes_ema']} below the EMA restart threshold).",
        f"- Held-out linearisation error {lin_formula(results.get('lin_sources', 2))} (mean over "
        f"elements): {fmt(results['lin_error_mean'])}; relative to ||B_Q(E(mix))||^2: "
        f"{fmt(results['lin_error_relative_mean'])}; the two codes agree at {fmt(results['lin_code_agreement_mean'])} "
        f"of the latent steps.",
        "",
    ]
    return "\n".join(lines)


def write_report(results, out_dir, config=None):
    paths = {"json": out_dir / "lqvae_report.json", "csv": out_dir / "lqvae_report.csv",
             "md": out_dir / "lqvae_report.md"}
    payload = {"results": results, "config": config}
    atomic_write_text(paths["json"], json.dumps(_jsonable(payload), indent=2, allow_nan=False) + "\n")

    def write_csv(stream):
        writer = csv.DictWriter(stream, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows(results))

    atomic_write(paths["csv"], write_csv)
    atomic_write_text(paths["md"], markdown(results))
    return paths


def log_to_wandb(results, run):
    import wandb

    table = wandb.Table(columns=list(COLUMNS), data=[[row[c] for c in COLUMNS] for row in rows(results)])
    run.log({"lqvae_report/table": table, "lqvae_report/perplexity": results["perplexity_all"],
             "lqvae_report/si_sdr_min": min(results["si_sdr"].values()),
             "lqvae_report/lin_error": results["lin_error_mean"]})


class LQVAEReport(ResultsReport):
    def write(self, results):
        return write_report(results, self.out_dir, self.config)

    def log_to_wandb(self, results, run):
        log_to_wandb(results, run)
