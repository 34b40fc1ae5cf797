"""Paper 003 Fig. 3: the noiseless FloWaveNet and WaveNet cross-likelihood matrices side by side, from
the two experiments' ``cross_likelihood.json`` (run ``make cross-likelihood`` for each). The dataset
is the prefix of ``experiment``: toy_flow compares toy_flow with toy_wavenet (the toy row),
musdb_flow compares musdb_flow with musdb_wavenet (the musdb row). The other families' matrices of the same
dataset (score, lqvae) join the comparison when their results exist, each labelled with its likelihood."""
import json
from pathlib import Path

from datamodules.atomic_io import atomic_write, atomic_write_text
from callbacks.cross_likelihood_report import discrimination_margins, plot_matrices



OPTIONAL_FAMILIES = ("score", "lqvae")
FAMILY_TITLES = {"score": "Score prior", "lqvae": "LQ-VAE + Transformer prior"}


def compared_experiments(experiment):
    dataset = experiment.rsplit("_", 1)[0]
    return dataset, (f"{dataset}_flow", f"{dataset}_wavenet")


def optional_experiments(dataset):
    return [f"{dataset}_{family}" for family in OPTIONAL_FAMILIES]


def noiseless_matrix(path):
    if not path.is_file():
        experiment = path.parts[-4]
        raise FileNotFoundError(f"no cross-likelihood results at {path}; run make cross-likelihood "
                                f"EXPERIMENT={experiment} first")
    results = json.loads(path.read_text())
    for entry in results["matrices"]:
        if float(entry["sigma_model"]) == 0.0:
            return results, entry["loglik"]
    raise ValueError(f"{path} has no noiseless (sigma_model=0) matrix")


def likelihood_label(results):
    model = (results.get("config") or {}).get("model", {})
    if model.get("name") in FAMILY_TITLES:
        method = results.get("likelihood_method") or "likelihood"
        return f"{FAMILY_TITLES[model['name']]}, {method.split(':')[0]}"
    if model.get("name") == "wavenet":
        return f"WaveNet, {model.get('likelihood') or 'mulaw'} likelihood"
    return "FloWaveNet, full density" + (" (LATENT ONLY)" if results.get("latent_only") else "")


def run_compare(config):
    root = Path(config.output_root)
    entries, rows = [], []
    dataset, experiments = compared_experiments(config.experiment)
    optional = [e for e in optional_experiments(dataset)
                if (root / e / config.run_name / "cross_likelihood" / "cross_likelihood.json").is_file()]
    for experiment in [*experiments, *optional]:
        path = root / experiment / config.run_name / "cross_likelihood" / "cross_likelihood.json"
        results, matrix = noiseless_matrix(path)
        label = likelihood_label(results)
        margins = discrimination_margins(matrix, results["sources"])
        entries.append({"sigma_model": 0.0, "sigma_data": 0.0, "loglik": matrix, "title": label})
        rows.append((label, results["sources"], matrix, margins, results.get("count")))
    sources = rows[0][1]
    if any(r[1] != sources for r in rows):
        raise ValueError("the two experiments were run on different source lists; compare like with like")
    out_dir = root / f"compare_{dataset}" / config.run_name
    png = atomic_write(out_dir / "comparison.png", lambda fh: plot_matrices({"sources": sources, "matrices": entries}, fh),
                       binary=True)
    atomic_write_text(out_dir / "comparison.md", markdown(rows, dataset))
    atomic_write_text(out_dir / "comparison.json", json.dumps(
        [{"model": label, "sources": s, "loglik": m, "margins": g, "count": c} for label, s, m, g, c in rows], indent=2))
    return out_dir, png


def markdown(rows, dataset):
    lines = [f"# Cross-likelihood, noiseless priors: {' vs '.join(r[0] for r in rows)} (paper 003 Fig. 3, {dataset} row)", "",
             "M[data source, prior] = mean log-likelihood per audio sample of the source's test set under the prior.",
             "A prior family discriminates when every diagonal entry is the largest of its row and of its column.", ""]
    for label, sources, matrix, margins, count in rows:
        lines += [f"## {label} ({count} test examples)", "", "| data / prior | " + " | ".join(sources) + " |",
                  "|---" * (len(sources) + 1) + "|"]
        for k, name in enumerate(sources):
            cells = [f"**{v:.4g}**" if j == k else f"{v:.4g}" for j, v in enumerate(matrix[k])]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "| source | row margin | column margin |", "|---|---|---|"]
        lines += [f"| {s} | {margins['row_margin'][s]:.4g} | {margins['column_margin'][s]:.4g} |" for s in sources]
        verdict = "yes" if margins["discriminates"] else "no"
        lines += ["", f"discriminates: **{verdict}** (min margin {margins['min_margin']:.4g})", ""]
    return "\n".join(lines)
