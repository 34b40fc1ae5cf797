"""A real tiny train -> finetune -> cross-likelihood run, through the same functions the CLI uses."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from callbacks.discrimination import discrimination
from experiments.config import load_config
from experiments.cross_likelihood import run_cross_likelihood
from experiments.run_layout import load_prior, prior_dir
from experiments.train import finetune, train_noiseless
from lightning_modules.prior_module import PriorModule
from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[1]


def val_logliks(run_dir):
    with open(Path(run_dir) / "logs" / "metrics.csv") as stream:
        return [float(row["val/loglik"]) for row in csv.DictReader(stream) if row.get("val/loglik")]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline") / "runs"
    config = load_config("toy_flow", "default", TINY + [f"output_root={root}"])
    train_noiseless(config)
    finetune(config, 0.077)
    train_noiseless(config, pooled=True)  # the discrimination report's pooled prior, at both levels
    finetune(config, 0.077, pooled=True)
    return config


def test_training_improves_likelihood_and_writes_run(trained_run):
    run_dir = prior_dir(trained_run, 0.0)
    history = val_logliks(run_dir)
    assert len(history) >= 3
    assert history[-1] > history[0] + 0.1, history
    done = json.loads((run_dir / "done.json").read_text())
    assert done["global_step"] == 60 and done["seed"] == 0
    assert (run_dir / "config.yaml").is_file()
    checkpoint = torch.load(run_dir / "last.ckpt", weights_only=True)  # loads without pickled objects
    assert checkpoint["global_step"] == 60 and "optimizer_states" in checkpoint and "rng_states" in checkpoint


def noisy_val_loglik(prior_module, config, sigma):
    """The validation loop's per-source value, recomputed here: the same val batches, noise seeded by batch."""
    from datamodules.registry import build_datamodule

    datamodule = build_datamodule(config.data, seed=config.seed, output_root=config.output_root)
    datamodule.setup("fit")
    sums, count = 0, 0
    with torch.no_grad():
        for batch_idx, batch in enumerate(datamodule.val_dataloader()):
            if batch_idx == config.trainer.limit_val_batches:
                break
            x = batch["sources"]
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(batch_idx))
            sums = sums + prior_module.log_prob(x + sigma * noise).sum(dim=0)
            count += x.shape[0]
    return sums / count


def test_finetune_starts_from_noiseless_and_keeps_each_priors_best(trained_run):
    run_dir = prior_dir(trained_run, 0.077)
    noisy = load_prior(run_dir)
    assert noisy.noise_sigma == 0.077
    done = json.loads((run_dir / "done.json").read_text())
    assert done["init_from"].endswith("noiseless") and done["noise_sigma"] == 0.077 and done["grid"] == "paper003"
    # The first fine-tuning check is near the noiseless prior's score on the same noisy data, far from
    # a fresh model's: the weights were carried over.
    first = val_logliks(run_dir)[0]
    carried = float(noisy_val_loglik(load_prior(prior_dir(trained_run, 0.0)), trained_run, 0.077).mean())
    torch.manual_seed(1)
    fresh = float(noisy_val_loglik(PriorModule(dict(trained_run.model), list(trained_run.data.sources)),
                                   trained_run, 0.077).mean())
    assert carried - fresh > 0.1, (carried, fresh)
    assert abs(first - carried) < 0.5 * (carried - fresh), (first, carried, fresh)
    # The finished run holds each prior at its own best check: its validation score equals the best recorded.
    recomputed = noisy_val_loglik(noisy, trained_run, 0.077)
    for k, source in enumerate(trained_run.data.sources):
        best = done["best"][source]
        assert best["best_step"] is not None and best["best_step"] <= done["global_step"]
        assert abs(float(recomputed[k]) - best["best_val_loglik"]) < 1e-4, (source, recomputed, done["best"])


def test_cross_likelihood_outputs(trained_run):
    results, out_dir = run_cross_likelihood(trained_run)
    assert [m["sigma_model"] for m in results["matrices"]] == [0.0, 0.077]
    assert results["noise_grid"]["sigma_data"] == [0.0, 0.077]
    assert results["count"] == 7
    for name in ("cross_likelihood.csv", "cross_likelihood.json", "matrices.png", "noise_grid.png",
                 "summary.md", "config.yaml"):
        assert (out_dir / name).is_file(), name
    loaded = json.loads((out_dir / "cross_likelihood.json").read_text())
    assert all(math.isfinite(v) for row in loaded["matrices"][0]["loglik"] for v in row)
    # The per-crop values behind the discrimination report: in index order, averaging to the matrices.
    per_crop = results["per_crop"]
    assert per_crop["index"] == list(range(7))
    for a, entry in enumerate(results["matrices"]):
        mean = torch.tensor(per_crop["loglik"][a], dtype=torch.float64).mean(dim=0)
        assert torch.allclose(mean, torch.tensor(entry["loglik"], dtype=torch.float64), rtol=1e-9, atol=1e-9)
    # The pooled prior's value of a crop is its own log_prob of that crop (test example 3, source 1, noiseless).
    from datamodules.registry import build_datamodule

    pooled = load_prior(prior_dir(trained_run, 0.0, pooled=True))
    assert pooled.sources == ["pooled"]
    data = build_datamodule(trained_run.data, seed=0, n_test=7)
    crop = data.dataset("test")[3]["sources"][1].view(1, 1, -1)
    with torch.no_grad():
        assert per_crop["pooled"][0][3][1] == pytest.approx(float(pooled.log_prob(crop)), abs=1e-5)
    assert all(math.isfinite(v) and v > 0 for level in per_crop["coder_length"] for crop in level for v in crop)
    report = json.loads((out_dir / "discrimination.json").read_text())
    assert [level["sigma_model"] for level in report["levels"]] == [0.0, 0.077]
    for level in report["levels"]:
        assert all(level[kind] is not None for kind in ("raw", "complexity", "ratio"))
        assert all(0 <= v <= 1 for v in level["raw"]["auroc"].values())
    for name in ("discrimination.csv", "discrimination.md", "discrimination.png"):
        assert (out_dir / name).is_file(), name


def test_pooled_prior_trains_on_every_sources_crops(trained_run, tmp_path, monkeypatch):
    from datamodules.registry import build_datamodule

    seen = []
    original = PriorModule.training_step

    def spy(self, batch, batch_idx):
        seen.append((batch["index"].clone(), batch["sources"].clone()))
        return original(self, batch, batch_idx)

    monkeypatch.setattr(PriorModule, "training_step", spy)
    config = load_config("toy_flow", "default", TINY + [f"output_root={tmp_path}", "trainer.max_steps=6"])
    train_noiseless(config, pooled=True)
    base = build_datamodule(config.data, seed=0).dataset("train")
    sources = set()
    for index, crops in seen:
        assert crops.shape == (8, 1, 256)
        for i, crop in zip(index.tolist(), crops):
            example, k = divmod(i, 4)
            assert torch.equal(crop[0], base[example]["sources"][k])
            sources.add(k)
    assert len(seen) == 6 and sources == {0, 1, 2, 3}
    done = json.loads((prior_dir(config, 0.0, pooled=True) / "done.json").read_text())
    assert done["pooled_sources"] == ["sine", "square", "saw", "triangle"]


def cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "experiments.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_ddp_cross_likelihood_equals_single_process(trained_run, tmp_path):
    common = ["cross-likelihood", *TINY, f"output_root={trained_run.output_root}", "data.eval_batch_size=2"]
    single = cli(*common, "run_name=default")
    assert single.returncode == 0, single.stderr[-2000:]
    single_json = json.loads((prior_dir(trained_run, 0.0).parent / "cross_likelihood" / "cross_likelihood.json").read_text())
    # 7 test examples over 2 ranks: a padding sampler would count one twice.
    ddp = cli(*common, "trainer.devices=2", "trainer.strategy=ddp")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    ddp_json = json.loads((prior_dir(trained_run, 0.0).parent / "cross_likelihood" / "cross_likelihood.json").read_text())
    assert ddp_json["count"] == single_json["count"] == 7
    for a, b in zip(single_json["matrices"], ddp_json["matrices"]):
        assert torch.allclose(torch.tensor(a["loglik"], dtype=torch.float64),
                              torch.tensor(b["loglik"], dtype=torch.float64), rtol=1e-5, atol=1e-5)
    assert torch.allclose(torch.tensor(single_json["noise_grid"]["loglik"], dtype=torch.float64),
                          torch.tensor(ddp_json["noise_grid"]["loglik"], dtype=torch.float64), rtol=1e-5, atol=1e-5)
    # The per-crop values (every prior's, the pooled prior's, the coder lengths) and so the discrimination report.
    single_crops, ddp_crops = single_json["per_crop"], ddp_json["per_crop"]
    assert single_crops["index"] == ddp_crops["index"] == list(range(7))
    for key in ("loglik", "pooled", "coder_length"):
        assert torch.allclose(torch.tensor(single_crops[key], dtype=torch.float64),
                              torch.tensor(ddp_crops[key], dtype=torch.float64), rtol=1e-5, atol=1e-5), key
    out = prior_dir(trained_run, 0.0).parent / "cross_likelihood" / "discrimination.json"
    assert json.loads(out.read_text())["levels"][0]["ratio"]["auroc"] == pytest.approx(
        discrimination(single_json)["levels"][0]["ratio"]["auroc"])


def test_bf16_mixed_precision_training_runs_on_cpu(tmp_path):
    config = load_config("toy_flow", "default,bf16", TINY + [f"output_root={tmp_path}", "trainer.max_steps=4",
                                                            "trainer.val_check_interval=2"])
    assert config.trainer.precision == "bf16-mixed"
    run_dir = train_noiseless(config)
    history = val_logliks(run_dir)
    assert history and all(math.isfinite(v) for v in history)
    prior = load_prior(run_dir)
    assert all(torch.isfinite(p).all() for p in prior.parameters())


def test_basis_grid_fine_tunes_serially(tmp_path):
    from experiments.run_layout import basis_sigmas
    from experiments.train import finetune_grid

    config = load_config("toy_flow", "default", TINY + [
        f"output_root={tmp_path}", "trainer.max_steps=2", "trainer.val_check_interval=2",
        "finetune.grid=basis", "finetune.max_steps=2", "finetune.val_check_interval=2"])
    train_noiseless(config)
    finetune_grid(config)
    sigmas = basis_sigmas()
    assert sigmas[0] == 0.01 and sigmas[-1] == 1.0 and len(sigmas) == 10
    previous = prior_dir(config, 0.0)
    for sigma in sigmas:
        level = prior_dir(config, sigma, "basis")
        done = json.loads((level / "done.json").read_text())
        assert done["noise_sigma"] == sigma and done["init_from"] == str(previous) and done["grid"] == "basis"
        previous = level
    # Its own layout: the paper003 folders of the shared sigmas (0.01, 0.129, 0.359) stay untouched.
    assert level.parent.name == "basis_grid"
    assert not prior_dir(config, 0.01).exists()


@pytest.mark.parametrize("likelihood", ["mulaw", "smoothed"])
def test_wavenet_train_finetune_cross_likelihood_and_compare(trained_run, likelihood, tmp_path):
    from experiments.compare import run_compare
    from tests.conftest import TINY_WAVENET

    root = tmp_path / "runs"
    config = load_config("toy_wavenet", "default", TINY_WAVENET + [f"output_root={root}", f"model.likelihood={likelihood}"])
    train_noiseless(config)
    history = val_logliks(prior_dir(config, 0.0))
    assert history[-1] > history[0] + 0.03, history
    finetune(config, 0.05)
    if likelihood == "smoothed":
        train_noiseless(config, pooled=True)  # the pooled WaveNet: the ratio score at sigma 0 only
    results, out_dir = run_cross_likelihood(config)
    assert [m["sigma_model"] for m in results["matrices"]] == [0.0, 0.05]
    levels = json.loads((out_dir / "discrimination.json").read_text())["levels"]
    assert (levels[0]["ratio"] is not None) == (likelihood == "smoothed") and levels[1]["ratio"] is None
    assert (levels[1]["complexity"] is not None) == (likelihood == "smoothed")  # mu-law: no density
    values = [v for m in results["matrices"] for row in m["loglik"] for v in row]
    assert all(math.isfinite(v) for v in values)
    if likelihood == "mulaw":
        assert all(v <= 0 for v in values)  # categorical probabilities
    # Flow results in the same root, then the side-by-side comparison.
    flow = load_config("toy_flow", "default", TINY + [f"output_root={root}"])
    target = prior_dir(flow, 0.0)
    target.mkdir(parents=True)
    for name in ("last.ckpt", "done.json"):
        (target / name).write_bytes((prior_dir(trained_run, 0.0) / name).read_bytes())
    run_cross_likelihood(flow)
    compare_dir, png = run_compare(flow)
    text = (compare_dir / "comparison.md").read_text()
    assert f"WaveNet, {likelihood} likelihood" in text and "FloWaveNet, full density" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_without_results_is_a_clear_error(tmp_path):
    from experiments.compare import run_compare

    with pytest.raises(FileNotFoundError, match="make cross-likelihood EXPERIMENT=toy_flow"):
        run_compare(load_config("toy_flow", "default", [f"output_root={tmp_path}"]))
