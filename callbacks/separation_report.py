"""Writes a separation test loop's results: WAVs (every rank, its own mixtures), then on rank zero the
per-mixture CSV, the summary JSON/Markdown, the sampler's trace plot, and W&B tables and audio."""
import csv
import io
import json
import math
from pathlib import Path

from callbacks.results_report import ResultsReport
from datamodules.atomic_io import atomic_write, atomic_write_text
from datamodules.audio_file import write_wav

SUMMARY_METRICS = ("si_sdr", "si_sdri", "sdr", "si_sdri_windowed")


class SeparationReport(ResultsReport):
    def __init__(self, out_dir, sample_rate, config=None, write_wavs=True, n_audio_examples=4):
        super().__init__(Path(out_dir), config)
        self.sample_rate, self.write_wavs, self.n_audio_examples = sample_rate, write_wavs, n_audio_examples
        self.audio_examples = []

    def on_test_epoch_start(self, trainer, pl_module):
        self.audio_examples = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        sources = pl_module.sources
        for b, index in enumerate(outputs["index"].tolist()):
            tracks = {"mix": outputs["mix"][b]}
            tracks.update({f"reference_{s}": outputs["references"][b, k] for k, s in enumerate(sources)})
            for method, estimates in outputs["estimates"].items():
                tracks.update({f"{method}_{s}": estimates[b, k] for k, s in enumerate(sources)})
            if self.write_wavs:
                for name, audio in tracks.items():
                    write_wav(self.out_dir / "wav" / f"{index:05d}" / f"{name}.wav", audio, self.sample_rate)
            if trainer.is_global_zero and len(self.audio_examples) < self.n_audio_examples:
                self.audio_examples.append((index, {k: v.float().cpu().numpy() for k, v in tracks.items()}))

    def write(self, results):
        return write_report(results, self.out_dir, self.config)

    def log_to_wandb(self, results, run):
        import wandb

        columns = list(results["rows"][0])
        payload = {
            "separation/rows": wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in results["rows"]]),
            "separation/summary": wandb.Table(
                columns=["method", *SUMMARY_METRICS],
                data=[[m, *(s.get(k) for k in SUMMARY_METRICS)] for m, s in results["summary"].items()],
            ),
            "separation/trace": wandb.Image(str(self.paths["trace"])),
        }
        for index, tracks in self.audio_examples:
            for name, audio in tracks.items():
                payload[f"separation/audio/{index:05d}/{name}"] = wandb.Audio(audio, sample_rate=self.sample_rate)
        run.log(payload)


def write_report(results, out_dir, config=None):
    out = Path(out_dir)
    paths = {"csv": atomic_write(out / "separation.csv", lambda stream: write_csv(results["rows"], stream))}
    payload = {k: v for k, v in results.items() if k != "rows"} | {"config": config}
    paths["json"] = atomic_write_text(out / "summary.json", json.dumps(payload, indent=2, allow_nan=True))
    paths["summary"] = atomic_write_text(out / "summary.md", summary_markdown(results))
    paths["trace"] = atomic_write(out / "trace.png", lambda stream: plot_trace(results["trace"], stream), binary=True)
    return paths


def write_csv(rows, stream):
    columns = list(dict.fromkeys(key for row in rows for key in row))
    writer = csv.DictWriter(stream, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)


def summary_markdown(results):
    sources = results["sources"]
    windowed = results.get("protocol") == "windowed"
    lines = [
        f"# {results['algorithm']} separation: {results['count']} mixtures of {', '.join(sources)}, "
        f"{results['n_chains']} chain(s) each",
        "",
        "Means over mixtures, dB. SI-SDRi = SI-SDR minus the mix's own SI-SDR against each reference.",
        "",
    ]
    mixing = results.get("mixing")
    if mixing:
        lines += [f"Mixing: {mixing['kind']} (alpha = {mixing['alpha']}, from {mixing['from']}).", ""]
    if windowed:
        lines += [f"Windowed SI-SDRi: windows of {results['window']} samples, hop {results['hop']}, those with at "
                  "most one active source skipped; the mean over every kept window of every mixture.", ""]
    extra = ["SI-SDRi windowed", "kept windows"] if windowed else []
    columns = ["method", "SI-SDR", "SI-SDRi", "SDR (BSSEval v4)", *extra, *(f"SI-SDR {s}" for s in sources)]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for method, stats in results["summary"].items():
        cells = [method, fmt(stats.get("si_sdr")), fmt(stats.get("si_sdri")), fmt(stats.get("sdr"))]
        if windowed:
            cells += [fmt(stats.get("si_sdri_windowed")), str(stats.get("windows_kept", "-"))]
        cells += [fmt(stats.get(f"si_sdr_{s}")) for s in sources]
        lines.append("| " + " | ".join(cells) + " |")
    if results.get("selection"):
        lines += ["", f"The selected chain is the one the selection prior ranks highest by its {results['selection']}."]
    per_second = results.get("seconds_per_audio_second")
    per_second = f" ({per_second:.2f} s per second of mixture)" if per_second is not None else ""
    lines += ["", f"Wall time {results['seconds']:.1f} s{per_second}; non-finite prior gradients skipped: "
              f"{results['nonfinite_prior_gradients']}.", ""]
    if results.get("relabelled_chains"):
        lines[-1:] = [f"Chains relabelled by the priors at least once: {results['relabelled_chains']} of "
                      f"{results['count'] * results['n_chains']}.", ""]
    return "\n".join(lines)


def fmt(value):
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def step_sigmas(trace):
    """The sigma of every trace entry; a trace written before ``step_sigmas`` has its levels instead."""
    if "step_sigmas" in trace:
        return list(trace["step_sigmas"])
    return [sigma for sigma, count in zip(trace["level_sigmas"], trace["steps_per_level"]) for _ in range(count)]


def constant_runs(values):
    """[(value, start, count)] of the runs of equal consecutive values."""
    runs = []
    for i, value in enumerate(values):
        if runs and runs[-1][0] == value:
            runs[-1][2] += 1
        else:
            runs.append([value, i, 1])
    return [tuple(run) for run in runs]


MAX_BANDS = 20  # more levels than this (a diffusion schedule) get a sigma curve instead of labelled bands


def plot_trace(trace, stream):
    """Log-likelihood (when the sampler has one) and mixture error along the sampler's steps, with the
    noise level: one shaded, labelled band per level (BASIS, SGLD), or sigma on a second axis (diffusion)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_loglik = any(not math.isnan(v) for v in trace["loglik"])
    figure, axes = plt.subplots(2 if has_loglik else 1, 1, figsize=(8, 6 if has_loglik else 3.5), sharex=True,
                                squeeze=False)
    axes = list(axes[:, 0])
    steps = range(len(trace["mix_error"]))
    if has_loglik:
        axes[0].plot(steps, trace["loglik"])
        axes[0].set_ylabel("log-lik (nats/sample)\nunder the level's prior")
    bottom = axes[-1]
    bottom.plot(steps, trace["mix_error"])
    bottom.set_ylabel("||m - g(x)||^2 / T")
    if any(v > 0 for v in trace["mix_error"]):
        bottom.set_yscale("log")
    bottom.set_xlabel("sampler step")
    sigmas = step_sigmas(trace)
    runs = constant_runs(sigmas)
    if len(runs) <= MAX_BANDS:
        for i, (sigma, start, count) in enumerate(runs):
            for axis in axes:
                if i % 2:
                    axis.axvspan(start, start + count, color="0.92")
            axes[0].text(start + count / 2, 1.0, f"{sigma:g}", transform=axes[0].get_xaxis_transform(),
                         ha="center", va="bottom", fontsize=7)
    else:
        twin = bottom.twinx()
        twin.plot(range(len(sigmas)), sigmas, color="0.5", linestyle="--")
        twin.set_ylabel("sigma (dashed)")
        if all(s > 0 for s in sigmas):
            twin.set_yscale("log")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    stream.write(buffer.getvalue())
