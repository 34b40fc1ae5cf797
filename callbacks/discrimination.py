"""How well each prior recognises its own source, in one number per prior, from the cross-likelihood test loop's
per-crop values (``results["per_crop"]``, lightning_modules/cross_likelihood.py). Pure functions over plain
lists, so a report can be rebuilt offline from a saved JSON.

Scores of a crop x under prior k, nats per sample, higher = more typical of source k:

    raw          log p_k(x)
    complexity   log p_k(x) + log(step) + L(x)     Serra et al. (ICLR 2020): -S(x), with L(x) the crop's FLAC
                                                   length and step its quantisation (lightning_modules/metrics/coder_length.py);
                                                   for densities only: n/a for a discrete family (mu-law WaveNet,
                                                   LQ-VAE codes), per_crop["complexity_unavailable"] says why
    ratio        log p_k(x) - log p_pooled(x)      Ren et al. (2019): against the same family trained on every
                                                   source pooled (make train-pooled)

Detection AUROC of prior k: the probability that prior k scores a random crop of source k above a random crop
of another source (ties count half; a nan score ranks lowest: a broken likelihood recognises nothing).
Arg-max accuracy of source k: the fraction of source k's crops whose highest-scoring prior is k (a tie among m
priors gives 1/m). Both corrections add the same amount to every prior's score of one crop, so they cannot
change the arg-max: they act on detection, where one prior compares different crops.
"""
import math

import numpy as np

SCORE_KINDS = ("raw", "complexity", "ratio")
SCORE_FORMULAS = {
    "raw": "log p_k(x)",
    "complexity": "log p_k(x) + log(step) + L(x)",
    "ratio": "log p_k(x) - log p_pooled(x)",
}


def average_ranks(values):
    """1-based ranks, ties sharing their mean rank; nan ranks below everything (as -inf)."""
    values = np.asarray(values, dtype=float)
    values = np.where(np.isnan(values), -np.inf, values)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse.reshape(-1)]


def auroc(positives, negatives):
    """P(score of a positive > score of a negative) + 0.5 P(tie), by the Mann-Whitney rank sum."""
    positives, negatives = np.ravel(positives), np.ravel(negatives)
    n_pos, n_neg = len(positives), len(negatives)
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = average_ranks(np.concatenate([positives, negatives]))
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def detection_auroc(scores):
    """scores [n crops, N data sources k, N priors j] -> [N]: prior k telling source k from the others."""
    scores = np.asarray(scores, dtype=float)
    n_sources = scores.shape[1]
    return [auroc(scores[:, k, k], np.delete(scores[:, :, k], k, axis=1)) for k in range(n_sources)]


def argmax_accuracy(scores):
    """scores [n, N(k), N(j)] -> [N]: per source k, the (tie-shared) fraction of its crops classified as k."""
    scores = np.asarray(scores, dtype=float)
    scores = np.where(np.isnan(scores), -np.inf, scores)
    best = scores == scores.max(axis=2, keepdims=True)  # [n, N, N]: the maxima of each crop's row
    n_sources = scores.shape[1]
    credit = [best[:, k, k] / best[:, k, :].sum(axis=1) for k in range(n_sources)]
    return [float(c.mean()) if len(c) else math.nan for c in credit]


def apply_score(kind, loglik, log_step=None, length=None, pooled=None):
    """``kind``'s score from the log-likelihoods and the per-crop terms (arrays broadcasting against loglik, or
    scalars); None when the term the score needs is missing."""
    if kind == "raw":
        return loglik
    if kind == "complexity":
        return None if length is None or log_step is None else loglik + log_step + length
    if kind == "ratio":
        return None if pooled is None else loglik - pooled
    raise ValueError(f"unknown score {kind!r}; choose from {list(SCORE_KINDS)}")


def crop_scores(per_crop, level, kind):
    """The [n, N(k), N(j)] scores of ``kind`` under model ``level``, or None when a term is missing."""
    if kind == "complexity" and per_crop.get("complexity_unavailable"):
        return None

    def per_data_source(values):  # [n, N(k)] -> [n, N(k), 1]: the same for every prior j
        return None if values is None else np.asarray(values, dtype=float)[:, :, None]

    lengths = per_crop["coder_length"][level] if per_crop.get("coder_length") is not None else None
    return apply_score(kind, np.asarray(per_crop["loglik"][level], dtype=float),
                       (per_crop.get("coder") or {}).get("log_step"), per_data_source(lengths),
                       per_data_source(per_crop["pooled"][level]))


def _worst(values, sources):
    """(lowest value, its source); nan counts as the worst."""
    if any(math.isnan(v) for v in values):
        k = next(i for i, v in enumerate(values) if math.isnan(v))
        return math.nan, sources[k]
    k = int(np.argmin(values))
    return float(values[k]), sources[k]


def level_metrics(per_crop, level, sources):
    """{kind: {auroc, accuracy (per source), worst_auroc, worst_source, mean_accuracy} or None}."""
    out = {}
    for kind in SCORE_KINDS:
        scores = crop_scores(per_crop, level, kind)
        if scores is None:
            out[kind] = None
            continue
        aurocs, accuracy = detection_auroc(scores), argmax_accuracy(scores)
        worst, worst_source = _worst(aurocs, sources)
        out[kind] = {"auroc": dict(zip(sources, aurocs)), "accuracy": dict(zip(sources, accuracy)),
                     "worst_auroc": worst, "worst_source": worst_source,
                     "mean_accuracy": float(np.mean(accuracy))}
    return out


def inputs_metrics(results):
    """Table 1's inputs under each score, beside each prior's own test data at the same sigma_model: the own
    crops' mean score and the fraction of them the input outscores (ties half; 1 = above all its own data)."""
    per_crop, sources = results["per_crop"], [str(s) for s in results["sources"]]
    levels = [float(s) for s in per_crop["sigma_model"]]
    log_step = (per_crop.get("coder") or {}).get("log_step")
    rows = []
    for entry in results.get("inputs_table") or []:
        level = levels.index(float(entry["sigma_model"]))
        for kind in SCORE_KINDS:
            value = apply_score(kind, np.asarray(entry["loglik"], dtype=float), log_step, entry.get("coder_length"),
                                entry.get("pooled"))
            own = crop_scores(per_crop, level, kind)
            if value is None or own is None:
                continue
            for k, name in enumerate(sources):
                own_k = own[:, k, k]
                rows.append({"input": entry["input"], "sigma_model": levels[level], "score": kind, "prior": name,
                             "value": float(value[k]), "own_mean": float(np.mean(own_k)),
                             "outscores_own": auroc([value[k]], own_k)})
    return rows


def discrimination(results):
    """The whole report as plain data: per sigma_model and score, per-source AUROC and arg-max accuracy; Table 1's
    inputs under each score."""
    per_crop = results["per_crop"]
    sources = [str(s) for s in results["sources"]]
    levels = [{"sigma_model": float(s), **level_metrics(per_crop, a, sources)}
              for a, s in enumerate(per_crop["sigma_model"])]
    unavailable = {"complexity": per_crop["complexity_unavailable"]} if per_crop.get("complexity_unavailable") else {}
    return {"sources": sources, "count": len(per_crop["index"]), "levels": levels, "inputs": inputs_metrics(results),
            "scores": SCORE_FORMULAS, "coder": per_crop.get("coder"), "unavailable": unavailable}
