"""Discrimination report files (CSV / JSON / Markdown / PNG) and W&B logging, beside the cross-likelihood
matrices: per prior and noise level, the detection AUROC and arg-max accuracy of the raw, complexity-corrected
and likelihood-ratio scores (callbacks/discrimination.py), and Table 1's inputs under each score."""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import IO, Any, Mapping

import numpy as np

from callbacks.cross_likelihood_report import (_figure, _fmt_md, _heatmap, _md_escape, _md_table, _save_png,
                                               _write_json)
from callbacks.discrimination import SCORE_KINDS, discrimination
from datamodules.atomic_io import atomic_write

COLUMNS = ("sigma_model", "score", "source", "auroc", "argmax_accuracy")
MISSING = {"complexity": "no coder lengths in these results",
           "ratio": "no pooled prior at this level (make train-pooled)"}


def long_rows(report: Mapping[str, Any]) -> list[dict]:
    rows = []
    for level in report["levels"]:
        for kind in SCORE_KINDS:
            metrics = level[kind]
            if metrics is None:
                continue
            for source in report["sources"]:
                rows.append({"sigma_model": level["sigma_model"], "score": kind, "source": source,
                             "auroc": metrics["auroc"][source], "argmax_accuracy": metrics["accuracy"][source]})
    return rows


def _write_csv(rows: list[dict], fh: IO[str]) -> None:
    writer = csv.writer(fh, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow([repr(r["sigma_model"]), r["score"], r["source"], repr(r["auroc"]),
                         repr(r["argmax_accuracy"])])


def _grid(report, kind, key):
    """[levels, sources] of ``key`` ("auroc" / "accuracy") for one score; nan where the score is missing."""
    return np.array([[level[kind][key][s] if level[kind] else math.nan for s in report["sources"]]
                     for level in report["levels"]], dtype=float)


def plot(report: Mapping[str, Any], fh: IO[bytes]) -> None:
    """Rows: AUROC, arg-max accuracy; columns: the three scores; each panel sigma_model x source, on [0, 1]."""
    from matplotlib.colors import Normalize

    sources, levels = report["sources"], [f"{lv['sigma_model']:g}" for lv in report["levels"]]
    side_x, side_y = 1.2 + 0.8 * len(sources), 1.0 + 0.45 * len(levels)
    fig = _figure((side_x * len(SCORE_KINDS) + 1.2, 2 * side_y + 0.8))
    axes = fig.subplots(2, len(SCORE_KINDS), squeeze=False)
    norm = Normalize(vmin=0.0, vmax=1.0)
    fontsize = max(5.0, min(9.0, 36.0 / len(sources)))
    image = None
    for column, kind in enumerate(SCORE_KINDS):
        for row, (key, label) in enumerate((("auroc", "AUROC"), ("accuracy", "arg-max accuracy"))):
            ax = axes[row, column]
            image = _heatmap(ax, _grid(report, kind, key), norm, levels, sources, fontsize)
            ax.set_title(f"{label}, {kind}", fontsize=10)
            ax.set(xlabel="source (its own prior)", ylabel="sigma_model")
    fig.colorbar(image, ax=list(axes.ravel()), shrink=0.8, label="AUROC, arg-max accuracy (AUROC 0.5 = chance)")
    fig.suptitle("Does each prior recognise its own source? (grey: score not available)", fontsize=10)
    _save_png(fig, fh)


def _cell(metrics, source, key):
    return "n/a" if metrics is None else _fmt_md(metrics[key][source])


def summary_md(report: Mapping[str, Any]) -> str:
    sources = report["sources"]
    names = [_md_escape(s) for s in sources]
    out = ["# Discrimination report", "",
           f"{report['count']} test crops per source. Scores of a crop x under prior k (nats per sample, higher = "
           "more typical of source k):", ""]
    out += [f"- **{kind}**: `{formula}`" for kind, formula in report["scores"].items()]
    coder = report.get("coder")
    if coder:
        out += ["", f"L(x): length under {coder['name']} of x clipped to [-1, 1) and rounded to {coder['bit_depth']}-bit "
                f"PCM at {coder['sample_rate']} Hz ({coder['units']}); log(step) = {coder['log_step']:.4f}."]
    out += ["", "AUROC of prior k: prior k's score ranks a crop of source k above a crop of another source "
            "(0.5 = chance). Arg-max accuracy of source k: its crops' highest-scoring prior is k. Both corrections "
            "shift every prior's score of a crop by the same amount, so the arg-max accuracy is the same for all "
            "three scores; they act on detection.", ""]
    for key, title in (("auroc", "Detection AUROC"), ("accuracy", "Arg-max accuracy")):
        out += [f"## {title}", ""]
        body = []
        for level in report["levels"]:
            for kind in SCORE_KINDS:
                metrics = level[kind]
                last = (_fmt_md(metrics["worst_auroc"]) + f" ({_md_escape(metrics['worst_source'])})"
                        if key == "auroc" and metrics else _fmt_md(metrics["mean_accuracy"]) if metrics else "n/a")
                body.append([f"{level['sigma_model']:g}", kind] + [_cell(metrics, s, key) for s in sources] + [last])
        out += _md_table(["sigma_model", "score"] + names + ["worst" if key == "auroc" else "mean"], body) + [""]
    out += ["## Does a correction raise the worst per-source AUROC?", ""]
    body = []
    for level in report["levels"]:
        raw = level["raw"]["worst_auroc"]
        cells = [f"{level['sigma_model']:g}", _fmt_md(raw)]
        for kind in ("complexity", "ratio"):
            metrics = level[kind]
            if metrics is None:
                cells.append(f"n/a ({report.get('unavailable', {}).get(kind, MISSING[kind])})")
            else:
                change = metrics["worst_auroc"] - raw
                cells.append(f"{_fmt_md(metrics['worst_auroc'])} ({'+' if change >= 0 else ''}{change:.3f})")
        body.append(cells)
    out += _md_table(["sigma_model", "raw", "complexity", "ratio"], body) + [""]
    if report["inputs"]:
        out += ["## Synthetic inputs (paper 003 Table 1) under each score", "",
                "Each cell: the input's score, then the fraction of the prior's own test crops it outscores "
                "(1 = above all of them).", ""]
        groups: dict = {}
        for row in report["inputs"]:
            groups.setdefault((row["input"], row["sigma_model"], row["score"]), {})[row["prior"]] = row
        body = [[_md_escape(i), f"{s:g}", kind] + [f"{_fmt_md(cells[p]['value'])} ({cells[p]['outscores_own']:.2f})"
                                                  if p in cells else "n/a" for p in sources]
                for (i, s, kind), cells in groups.items()]
        out += _md_table(["input", "sigma_model", "score"] + names, body) + [""]
    return "\n".join(out)


def write_report(results: Mapping[str, Any], out_dir: str | os.PathLike, config: dict | None = None) -> dict:
    """discrimination.{csv,json,md,png} in ``out_dir``; returns {"discrimination_*": Path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = discrimination(results)
    rows = long_rows(report)
    return {
        "discrimination_csv": atomic_write(out / "discrimination.csv", lambda fh: _write_csv(rows, fh)),
        "discrimination_json": atomic_write(out / "discrimination.json",
                                            lambda fh: _write_json({**report, "config": config}, fh)),
        "discrimination": atomic_write(out / "discrimination.png", lambda fh: plot(report, fh), binary=True),
        "discrimination_summary": atomic_write(out / "discrimination.md", lambda fh: fh.write(summary_md(report))),
    }


def log_to_wandb(results: Mapping[str, Any], run: Any, paths: Mapping[str, Any] | None = None,
                 prefix: str = "discrimination") -> None:
    """The long table, the figure and one worst-AUROC scalar per noise level and score."""
    import wandb

    report = discrimination(results)
    rows = long_rows(report)
    payload: dict[str, Any] = {f"{prefix}/table": wandb.Table(columns=list(COLUMNS),
                                                              data=[[r[c] for c in COLUMNS] for r in rows])}
    if paths and paths.get("discrimination") is not None:
        payload[f"{prefix}/figure"] = wandb.Image(os.fspath(paths["discrimination"]))
    for level in report["levels"]:
        for kind in SCORE_KINDS:
            if level[kind] is not None:
                payload[f"{prefix}/worst_auroc_{kind}_sigma_{level['sigma_model']:g}"] = level[kind]["worst_auroc"]
    run.log(payload)
