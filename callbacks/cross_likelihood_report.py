"""Cross-likelihood report (CSV / JSON / PNG / Markdown / W&B) for source priors.

Pure functions over the plain ``results`` dict, so a report can be rebuilt
offline from a saved JSON without Lightning or a GPU.  Values may be -inf/nan
(a diverged prior) or hugely negative; nothing here may crash on them, since a
broken prior is exactly what the report must expose.

A noise-conditional family (score priors) adds ``results["denoising_loss"]``: per sigma, the matrix
``mse[k][j]`` of prior j's denoising MSE on source k (lower = better; not a likelihood). It goes into the
same CSV (kind ``denoising_mse``: sigma_model = sigma_data = the denoising sigma and the last column holds
the MSE, not a log-likelihood), the JSON, ``denoising_loss.png`` (one heatmap per sigma), summary.md and
W&B. ``results["likelihood_method"]``, when given, is stated under every likelihood table of summary.md.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import IO, Any, Mapping

import numpy as np

from datamodules.atomic_io import atomic_write

COLUMNS = ("kind", "source", "prior", "sigma_model", "sigma_data", "loglik")

# Below |v| = 10 the log-likelihoods of healthy priors live (a few nats), so the
# colour scale stays linear there and only compresses the diverged tail.
LINTHRESH = 10.0


def _fmt_cell(v: float) -> str:
    """Compact value for heatmap cells (width matters more than precision)."""
    if not math.isfinite(v):
        return _fmt_md(v)
    if v == 0.0 or 0.01 <= abs(v) < 100.0:
        return f"{v:.2f}"
    return f"{v:.1e}"


def _fmt_md(v: float) -> str:
    if math.isnan(v):
        return "nan"
    return f"{v:.4g}" if math.isfinite(v) else ("inf" if v > 0 else "-inf")


def _max_or_nan(values: list[float]) -> float:
    # Python's max() is order-dependent with nan; an unknown competitor score
    # must make the margin unknown rather than silently ignored.
    if not values or any(math.isnan(v) for v in values):
        return math.nan
    return max(values)


def _as_array(values: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.shape != shape:
        raise ValueError(f"{what}: expected shape {shape}, got {arr.shape}")
    return arr


def _sigma_data_of(entry: Mapping[str, Any]) -> float:
    sd = entry.get("sigma_data")
    return float(entry["sigma_model"]) if sd is None else float(sd)


def discrimination_margins(loglik: Any, sources: list[str]) -> dict:
    """Row/column margins of an N x N cross-likelihood matrix.

    row_margin[k]    = M[k][k] - max_{j!=k} M[k][j]  (source k prefers its own prior)
    column_margin[k] = M[k][k] - max_{i!=k} M[i][k]  (prior k prefers its own source)

    A margin is nan when it cannot be decided (nan entries, -inf on both sides,
    or N == 1), and nan counts as "does not discriminate".
    """
    sources = [str(s) for s in sources]
    n = len(sources)
    m = _as_array(loglik, (n, n), "loglik matrix").tolist()
    row: dict[str, float] = {}
    col: dict[str, float] = {}
    for k, name in enumerate(sources):
        diag = float(m[k][k])
        row[name] = float(diag - _max_or_nan([m[k][j] for j in range(n) if j != k]))
        col[name] = float(diag - _max_or_nan([m[i][k] for i in range(n) if i != k]))
    margins = list(row.values()) + list(col.values())
    min_margin = math.nan if not margins or any(math.isnan(v) for v in margins) else min(margins)
    return {"row_margin": row, "column_margin": col, "min_margin": float(min_margin),
            "discriminates": bool(margins) and all(v > 0 for v in margins)}


def _all_margins(results: Mapping[str, Any]) -> list[dict]:
    return [{"sigma_model": float(e["sigma_model"]), "sigma_data": _sigma_data_of(e),
             **discrimination_margins(e["loglik"], results["sources"])}
            for e in results.get("matrices") or []]


def long_rows(results: Mapping[str, Any]) -> list[dict]:
    """Flatten results to one dict per number, columns as in ``COLUMNS``.

    noise_grid rows use source == prior (own-source data); inputs rows carry
    the input name in ``source`` and sigma_data None.
    """
    sources = [str(s) for s in results["sources"]]
    n = len(sources)
    rows: list[dict] = []

    def add(*values: Any) -> None:
        rows.append(dict(zip(COLUMNS, values)))

    for entry in results.get("matrices") or []:
        m = _as_array(entry["loglik"], (n, n), "matrices[].loglik")
        sm, sd = float(entry["sigma_model"]), _sigma_data_of(entry)
        for k, src in enumerate(sources):
            for j, prior in enumerate(sources):
                add("matrix", src, prior, sm, sd, float(m[k, j]))
    grid = results.get("noise_grid")
    if grid:
        sms = [float(s) for s in grid["sigma_model"]]
        sds = [float(s) for s in grid["sigma_data"]]
        g = _as_array(grid["loglik"], (len(sms), len(sds), n), "noise_grid.loglik")
        for a, sm in enumerate(sms):
            for b, sd in enumerate(sds):
                for k, src in enumerate(sources):
                    add("noise_grid", src, src, sm, sd, float(g[a, b, k]))
    for entry in results.get("inputs_table") or []:
        v = _as_array(entry["loglik"], (n,), "inputs_table[].loglik")
        for j, prior in enumerate(sources):
            add("inputs", str(entry["input"]), prior, float(entry["sigma_model"]), None, float(v[j]))
    if results.get("denoising_loss"):
        sigmas, mse = _denoising(results)
        for s, sigma in enumerate(sigmas):
            for k, src in enumerate(sources):
                for j, prior in enumerate(sources):
                    add(DENOISING_KIND, src, prior, sigma, sigma, float(mse[s, k, j]))
    return rows


DENOISING_KIND = "denoising_mse"  # CSV rows whose last column is a denoising MSE, not a log-likelihood


def _denoising(results: Mapping[str, Any]) -> tuple[list[float], np.ndarray]:
    block = results["denoising_loss"]
    sigmas = [float(s) for s in block["sigmas"]]
    n = len(results["sources"])
    return sigmas, _as_array(block["mse"], (len(sigmas), n, n), "denoising_loss.mse")


def denoising_margins(results: Mapping[str, Any]) -> list[dict]:
    """discrimination_margins of -MSE per sigma: positive when each source is denoised best by its own prior."""
    if not results.get("denoising_loss"):
        return []
    sigmas, mse = _denoising(results)
    return [{"sigma": sigma, **discrimination_margins(-mse[s], results["sources"])} for s, sigma in enumerate(sigmas)]


def _write_csv(rows: list[dict], fh: IO[str]) -> None:
    writer = csv.writer(fh, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        # repr keeps full precision and spells non-finite values as nan/inf/-inf.
        writer.writerow([r["kind"], r["source"], r["prior"], repr(r["sigma_model"]),
                         "" if r["sigma_data"] is None else repr(r["sigma_data"]),
                         repr(r["loglik"])])


def _jsonable(obj: Any) -> Any:
    # Strict JSON has no NaN/Infinity; strings keep the information and
    # float("-inf") parses them back.  Unknown config objects degrade to str.
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else _fmt_md(obj)
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy arrays/scalars, torch tensors
        return _jsonable(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def _write_json(payload: Any, fh: IO[str]) -> None:
    fh.write(json.dumps(_jsonable(payload), indent=2, allow_nan=False) + "\n")


def _heatmap(ax, data: np.ndarray, norm, row_labels, col_labels, fontsize: float,
             reverse: bool = False) -> Any:
    """reverse: low values bright (a loss), so that bright always means "explains the data better"."""
    import matplotlib

    cmap = matplotlib.colormaps["viridis_r" if reverse else "viridis"].with_extremes(bad="lightgray")
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, norm=norm, aspect="auto")
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels], rotation=45, ha="right")
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels])
    for (i, j), v in np.ndenumerate(data):
        # viridis is dark at the low end; masked cells are light grey.
        color = "black"
        if math.isfinite(v):
            shade = 1.0 - float(norm(v)) if reverse else float(norm(v))
            color = "white" if shade <= 0.6 else "black"
        ax.text(j, i, _fmt_cell(float(v)), ha="center", va="center", color=color, fontsize=fontsize)
    return im


def _symlog_norm(values: np.ndarray):
    from matplotlib.colors import SymLogNorm

    finite = values[np.isfinite(values)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 1.0, vmax + 1.0
    return SymLogNorm(linthresh=LINTHRESH, linscale=1.0, vmin=vmin, vmax=vmax, base=10)


def _figure(figsize):
    # Figure() without pyplot renders through Agg, never touches the global
    # backend (safe headless and inside notebooks) and leaves no figure
    # registered with pyplot that would need closing.
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def _save_png(fig, fh: IO[bytes]) -> None:
    fig.savefig(fh, format="png", dpi=120)


def plot_matrices(results: Mapping[str, Any], fh: IO[bytes]) -> None:
    sources = [str(s) for s in results["sources"]]
    n = len(sources)
    entries = list(results["matrices"])
    mats = [_as_array(e["loglik"], (n, n), "matrices[].loglik") for e in entries]
    norm = _symlog_norm(np.stack(mats))
    ncols, side = min(len(mats), 3), 1.0 + 0.9 * n
    nrows = math.ceil(len(mats) / ncols)
    fig = _figure((side * ncols + 1.5, side * nrows + 0.5))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    fontsize = max(5.0, min(9.0, 36.0 / n))
    im = None
    for ax, entry, m in zip(axes, entries, mats):
        im = _heatmap(ax, m, norm, sources, sources, fontsize)
        sm, sd = float(entry["sigma_model"]), _sigma_data_of(entry)
        title = entry.get("title") or f"sigma_model={sm:g}" + ("" if sd == sm else f", sigma_data={sd:g}")
        ax.set_title(title, fontsize=10)
        ax.set(xlabel="prior", ylabel="data source")
    for ax in axes[len(mats):]:
        ax.set_visible(False)
    fig.colorbar(im, ax=list(axes[: len(mats)]), shrink=0.8, label="log-likelihood (nats/sample)")
    _save_png(fig, fh)


def _grid_mean(results: Mapping[str, Any]) -> tuple[list[float], list[float], np.ndarray]:
    grid = results["noise_grid"]
    sms = [float(s) for s in grid["sigma_model"]]
    sds = [float(s) for s in grid["sigma_data"]]
    g = _as_array(grid["loglik"], (len(sms), len(sds), len(results["sources"])), "noise_grid.loglik")
    # Plain mean, not nanmean: one diverged source must show up in the average.
    with np.errstate(invalid="ignore"):
        return sms, sds, g.mean(axis=2)


def _plot_noise_grid(results: Mapping[str, Any], fh: IO[bytes]) -> None:
    sms, sds, mean = _grid_mean(results)
    norm = _symlog_norm(mean)
    fig = _figure((1.5 + 1.0 * len(sds), 1.2 + 0.7 * len(sms)))
    ax = fig.subplots()
    im = _heatmap(ax, mean, norm, [f"{s:g}" for s in sms], [f"{s:g}" for s in sds], 9.0)
    ax.set(xlabel="sigma_data", ylabel="sigma_model")
    ax.set_title("mean log-likelihood over sources", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    _save_png(fig, fh)


def plot_denoising(results: Mapping[str, Any], fh: IO[bytes]) -> None:
    """One heatmap per denoising sigma, in a row, each on its own linear scale (the MSE grows with sigma)."""
    from matplotlib.colors import Normalize

    sources = [str(s) for s in results["sources"]]
    n = len(sources)
    sigmas, mse = _denoising(results)
    side = 1.0 + 0.9 * n
    fig = _figure((side * len(sigmas) + 1.0, side + 1.0))
    axes = fig.subplots(1, len(sigmas), squeeze=False).ravel()
    fontsize = max(5.0, min(9.0, 36.0 / n))
    for ax, sigma, m in zip(axes, sigmas, mse):
        finite = m[np.isfinite(m)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        norm = Normalize(vmin=low, vmax=high if high > low else low + 1e-12)
        im = _heatmap(ax, m, norm, sources, sources, fontsize, reverse=True)
        ax.set_title(f"sigma={sigma:g}", fontsize=10)
        ax.set(xlabel="prior", ylabel="data source")
        fig.colorbar(im, ax=ax, shrink=0.7)
    fig.suptitle("denoising MSE ||D_j(x_k + sigma eps, sigma) - x_k||^2 / T (lower = better; not a likelihood)",
                 fontsize=10)
    _save_png(fig, fh)


def _md_escape(s: Any) -> str:
    return str(s).replace("|", "\\|")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _summary_md(results: Mapping[str, Any], margins: list[dict]) -> str:
    sources = [str(s) for s in results["sources"]]
    n = len(sources)
    names = [_md_escape(s) for s in sources]
    quantity = ("LATENT TERM ONLY (no log-determinants; the thesis code's quantity, not a density)"
                if results.get("latent_only") else "full log-likelihood (base density + every log-det)")
    method = results.get("likelihood_method")
    if method and not results.get("latent_only") and not str(method).startswith("exact (change of variables)"):
        quantity = "log-likelihood"  # log-dets are flow language
    method_line = [f"log-likelihood by: {_md_escape(method)}", ""] if method else []
    out = ["# Cross-likelihood report", "",
           f"Mean {quantity} in nats per audio sample; rows are data sources, columns are priors.", ""]
    for entry, mg in zip(results.get("matrices") or [], margins):
        m = _as_array(entry["loglik"], (n, n), "matrices[].loglik")
        head = f"## sigma_model={mg['sigma_model']:g}, sigma_data={mg['sigma_data']:g}"
        if entry.get("count") is not None:
            head += f" (count {entry['count']})"
        out += [head, ""]
        body = [[names[k]] + [(f"**{_fmt_md(m[k, j])}**" if j == k else _fmt_md(m[k, j]))
                              for j in range(n)] for k in range(n)]
        out += _md_table(["data / prior"] + names, body) + [""] + method_line
        body = [[names[k], _fmt_md(mg["row_margin"][s]), _fmt_md(mg["column_margin"][s])]
                for k, s in enumerate(sources)]
        out += _md_table(["source", "row margin", "column margin"], body) + [""]
        verdict = "yes" if mg["discriminates"] else "no"
        out += [f"discriminates: {verdict} (min margin {_fmt_md(mg['min_margin'])})", ""]
    if results.get("noise_grid"):
        sms, sds, mean = _grid_mean(results)
        out += ["## Noise grid (own-source data, mean over sources)", ""]
        body = [[f"{sm:g}"] + [_fmt_md(v) for v in mean[a]] for a, sm in enumerate(sms)]
        out += _md_table(["sigma_model / sigma_data"] + [f"{s:g}" for s in sds], body) + [""] + method_line
    if results.get("inputs_table"):
        out += ["## Synthetic inputs", ""]
        body = []
        for entry in results["inputs_table"]:
            v = _as_array(entry["loglik"], (n,), "inputs_table[].loglik")
            body.append([_md_escape(entry["input"]), f"{float(entry['sigma_model']):g}"]
                        + [_fmt_md(x) for x in v])
        out += _md_table(["input", "sigma_model"] + names, body) + [""] + method_line
    if results.get("denoising_loss"):
        sigmas, mse = _denoising(results)
        label = results["denoising_loss"].get("label") or "denoising MSE (lower = better); not a likelihood"
        out += ["## Denoising loss (not a likelihood)", "",
                f"Mean {_md_escape(label)}; rows are data sources (clean test examples), columns are priors.", ""]
        for (s, sigma), mg in zip(enumerate(sigmas), denoising_margins(results)):
            out += [f"### sigma={sigma:g}", ""]
            body = [[names[k]] + [(f"**{_fmt_md(mse[s, k, j])}**" if j == k else _fmt_md(mse[s, k, j]))
                                  for j in range(n)] for k in range(n)]
            out += _md_table(["data / prior"] + names, body) + [""]
            verdict = "yes" if mg["discriminates"] else "no"
            out += [f"lowest on the diagonal: {verdict} (min margin {_fmt_md(mg['min_margin'])})", ""]
    return "\n".join(out)


def write_report(results: Mapping[str, Any], out_dir: str | os.PathLike,
                 config: dict | None = None) -> dict[str, Path]:
    """Write csv, json, matrices.png, noise_grid.png and denoising_loss.png (if any) and summary.md.

    Returns {"csv", "json", "matrices", "noise_grid", "denoising_loss", "summary"} -> Path, with
    only the files actually written (no matrices / no noise grid / no denoising loss -> no PNG).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = long_rows(results)  # validates shapes before anything is written
    margins = _all_margins(results)
    paths: dict[str, Path] = {}
    paths["csv"] = atomic_write(out / "cross_likelihood.csv", lambda fh: _write_csv(rows, fh))
    payload = {**results, "margins": margins, "config": config}
    if results.get("denoising_loss"):
        payload["denoising_loss_margins"] = denoising_margins(results)
    paths["json"] = atomic_write(out / "cross_likelihood.json", lambda fh: _write_json(payload, fh))
    for key, plot in (("matrices", plot_matrices), ("noise_grid", _plot_noise_grid),
                      ("denoising_loss", plot_denoising)):
        if results.get(key):
            paths[key] = atomic_write(out / f"{key}.png", lambda fh, p=plot: p(results, fh), binary=True)
    text = _summary_md(results, margins)
    paths["summary"] = atomic_write(out / "summary.md", lambda fh: fh.write(text))
    return paths


def log_to_wandb(results: Mapping[str, Any], run: Any, *,
                 paths: Mapping[str, str | os.PathLike] | None = None,
                 prefix: str = "cross_likelihood") -> None:
    """Log the long table, the PNGs from ``paths`` (write_report's return) and
    one min-margin scalar per matrix, in a single ``run.log`` call."""
    import wandb  # lazy: only needed when a run is actually being logged to

    rows = long_rows(results)
    table = wandb.Table(columns=list(COLUMNS), data=[[r[c] for c in COLUMNS] for r in rows])
    payload: dict[str, Any] = {f"{prefix}/table": table}
    for key in ("matrices", "noise_grid", "denoising_loss"):
        if paths and paths.get(key) is not None:
            payload[f"{prefix}/{key}"] = wandb.Image(os.fspath(paths[key]))
    for mg in _all_margins(results):
        payload[f"{prefix}/min_margin_sigma_{mg['sigma_model']}"] = mg["min_margin"]
    run.log(payload)
