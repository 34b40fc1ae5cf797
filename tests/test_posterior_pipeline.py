"""The variational posterior end to end on tiny flow priors: make train-posterior (mixtures only, resumable
layout, a prior change refused), separation.algorithm=variational in the test loop (single process and DDP),
separation.init=variational, and the errors a user can hit."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.cli import main
from experiments.config import load_config
from experiments.run_layout import load_prior
from experiments.train import train_noiseless
from lightning_modules.posterior_module import PosteriorModule
from tests.conftest import TINY, TINY_POSTERIOR, logged

REPO = Path(__file__).resolve().parents[1]
SEPARATE = ["separation.n_test=3", "separation.n_chains=2", "separation.museval=false", "separation.length=256"]


@pytest.fixture(scope="module")
def posterior_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("posterior") / "runs"
    common = TINY + [f"output_root={root}"]
    train_noiseless(load_config("toy_flow", "default", common))
    seen = []
    original = PosteriorModule.training_step

    def spy(self, batch, batch_idx):
        seen.append(set(batch))
        return original(self, batch, batch_idx)

    PosteriorModule.training_step = spy
    try:
        assert main(["train-posterior", "experiment=toy_flow", *common, *TINY_POSTERIOR]) == 0
    finally:
        PosteriorModule.training_step = original
    return {"common": common, "root": root, "seen": seen,
            "dir": root / "toy_flow" / "default" / "posterior" / "sine-square-saw-triangle"}


def test_training_sees_mixtures_only_and_improves_the_elbo(posterior_run):
    assert len(posterior_run["seen"]) == 30 and all(keys == {"mix", "index"} for keys in posterior_run["seen"])
    run_dir = posterior_run["dir"]
    for name in ("done.json", "config.yaml", "posterior_source.json", "last.ckpt"):
        assert (run_dir / name).is_file(), name
    source = json.loads((run_dir / "posterior_source.json").read_text())
    assert source["prior_dir"].endswith("noiseless") and len(source["sha256"]) == 64
    state = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert state and not any(key.startswith("prior.") for key in state)  # the frozen prior stays where it is
    elbo = logged(run_dir, "val/elbo")
    assert len(elbo) == 3 and elbo[-1] > elbo[0]
    assert logged(run_dir, "val/elbo_at_references") and logged(run_dir, "val/si_sdri_mean")
    # Finished: a second run changes nothing.
    before = (run_dir / "last.ckpt").stat().st_mtime
    assert main(["train-posterior", "experiment=toy_flow", *posterior_run["common"], *TINY_POSTERIOR]) == 0
    assert (run_dir / "last.ckpt").stat().st_mtime == before


def separation_rows(out_dir):
    with open(Path(out_dir) / "separation.csv") as stream:
        return list(csv.DictReader(stream))


def test_variational_separation_rows_and_ddp_equality(posterior_run):
    args = ["separate", "experiment=toy_flow", *posterior_run["common"], *SEPARATE,
            "separation.algorithm=variational", "separation.name=variational_ddp"]
    out_dir = posterior_run["root"] / "toy_flow" / "default" / "separation" / "variational_ddp"
    single = subprocess.run([sys.executable, "-m", "experiments.cli", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    single_rows = separation_rows(out_dir)
    assert {r["method"] for r in single_rows} == {"average", "variational", "variational_mean",
                                                  "variational_selected_of_2", "variational_oracle_of_2",
                                                  "variational_consensus_of_2"}
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["config"]["posterior"]["posterior_dir"].endswith("sine-square-saw-triangle")
    ddp = subprocess.run([sys.executable, "-m", "experiments.cli", *args, "trainer.devices=2", "trainer.strategy=ddp"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    ddp_rows = separation_rows(out_dir)
    assert len(ddp_rows) == len(single_rows) == 18
    for a, b in zip(single_rows, ddp_rows):
        assert (a["index"], a["method"], a["chain"]) == (b["index"], b["method"], b["chain"])
        assert float(a["si_sdr"]) == pytest.approx(float(b["si_sdr"]), abs=1e-3)
    mean = [r for r in single_rows if r["method"] == "variational_mean"]
    sample = [r for r in single_rows if r["method"] == "variational"]
    assert all(m["chain"] == "" for m in mean) and all(s["chain"] == "0" for s in sample)
    assert [m["si_sdr"] for m in mean] != [s["si_sdr"] for s in sample]


def test_a_langevin_sampler_starts_from_the_posterior_samples(posterior_run):
    """SGLD with a vanishing step stays where it starts: at the posterior's own samples (same seeds)."""
    common = ["experiment=toy_flow", *posterior_run["common"], *SEPARATE]
    assert main(["separate", *common, "separation.algorithm=variational", "separation.name=v"]) == 0
    assert main(["separate", *common, "separation.algorithm=sgld", "separation.init=variational",
                 "separation.sgld_prior_sigma=0", "separation.sgld_steps=2", "separation.sgld_eta=1e-12",
                 "separation.name=s"]) == 0
    separation = posterior_run["root"] / "toy_flow" / "default" / "separation"
    variational = {r["index"]: float(r["si_sdr"]) for r in separation_rows(separation / "v") if r["method"] == "variational"}
    sgld = {r["index"]: float(r["si_sdr"]) for r in separation_rows(separation / "s") if r["method"] == "sgld"}
    assert sgld.keys() == variational.keys()
    assert all(sgld[i] == pytest.approx(variational[i], abs=1e-3) for i in sgld)
    summary = json.loads((separation / "s" / "summary.json").read_text())
    assert summary["config"]["init_posterior"]["prior_dir"].endswith("noiseless")
    # Uniform starts are far from there.
    assert main(["separate", *common, "separation.algorithm=sgld", "separation.sgld_prior_sigma=0",
                 "separation.sgld_steps=2", "separation.sgld_eta=1e-12", "separation.name=u"]) == 0
    uniform = {r["index"]: float(r["si_sdr"]) for r in separation_rows(separation / "u") if r["method"] == "sgld"}
    assert all(uniform[i] < variational[i] - 3 for i in uniform)


def test_a_changed_prior_is_refused(posterior_run, tmp_path, capsys):
    import shutil

    root = tmp_path / "runs"
    shutil.copytree(posterior_run["root"] / "toy_flow", root / "toy_flow")
    checkpoint = root / "toy_flow" / "default" / "noiseless" / "last.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    next(iter(state["state_dict"].values())).add_(0.01)
    torch.save(state, checkpoint)
    args = ["experiment=toy_flow", *TINY, f"output_root={root}", *SEPARATE, "separation.algorithm=variational"]
    assert main(["separate", *args]) == 2
    assert "changed since it was trained" in capsys.readouterr().err
    assert main(["train-posterior", "experiment=toy_flow", *TINY, f"output_root={root}", *TINY_POSTERIOR]) == 2


@pytest.mark.parametrize("args, message", [
    (["separation.algorithm=variational", "separation.sources=[sine,square]"], "make train-posterior"),
    (["separation.algorithm=latent", "separation.init=variational"], "init=variational seeds"),
    (["separation.init=bogus"], "unknown separation.init"),
])
def test_separation_errors_name_the_fix(posterior_run, args, message, capsys):
    assert main(["separate", "experiment=toy_flow", *posterior_run["common"], *SEPARATE, *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("experiment, args, message", [
    ("toy_flow", ["posterior.prior_sigma=0.5"], "no finished prior at sigma 0.5"),
    ("toy_flow", ["posterior.gamma=0"], "posterior.gamma must be a positive number"),
    ("toy_flow", ["posterior.sources=[sine,drums]"], "posterior.sources must be"),
    ("toy_flow", ["posterior.derived=drums"], "posterior.derived='drums' is not one of the posterior's sources"),
    ("toy_flow", ["posterior.name=sleep", "posterior.sleep_steps=5", "posterior.sleep_temperature=0"],
     "sleep_temperature must be positive"),
    ("toy_lqvae", [], "separation.algorithm=latent"),
    ("toy_wavenet", [], "model.likelihood=smoothed"),
])
def test_train_posterior_errors_name_the_fix(posterior_run, experiment, args, message, capsys):
    common = [a for a in posterior_run["common"] if experiment == "toy_flow" or not a.startswith("model.")]
    assert main(["train-posterior", f"experiment={experiment}", *common, *TINY_POSTERIOR, *args]) == 2
    assert message in capsys.readouterr().err


def test_train_posterior_runs_under_ddp(posterior_run, tmp_path):
    import shutil

    root = tmp_path / "runs"
    shutil.copytree(posterior_run["root"] / "toy_flow" / "default" / "noiseless",
                    root / "toy_flow" / "default" / "noiseless")
    args = ["train-posterior", "experiment=toy_flow", *TINY, f"output_root={root}", *TINY_POSTERIOR,
            "posterior.max_steps=6", "posterior.val_check_interval=3", "trainer.devices=2", "trainer.strategy=ddp"]
    ddp = subprocess.run([sys.executable, "-m", "experiments.cli", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    run_dir = root / "toy_flow" / "default" / "posterior" / "sine-square-saw-triangle"
    done = json.loads((run_dir / "done.json").read_text())
    assert done["global_step"] == 6 and done["skipped_steps"] == 0
    assert len(logged(run_dir, "val/elbo")) == 2


def test_a_users_file_is_separated_into_the_posterior_mean(posterior_run, tmp_path):
    from datamodules.audio_file import write_wav
    from datamodules.toy import ToyDataset

    mix = ToyDataset("test", 1, ["sine", "square", "saw", "triangle"], 2000, 16000)[0]["mix"]
    write_wav(tmp_path / "mix.wav", mix, 16000)
    out = tmp_path / "separated"
    assert main(["separate-file", "experiment=toy_flow", *posterior_run["common"], *SEPARATE,
                 "separation.algorithm=variational", f"mix={tmp_path / 'mix.wav'}", f"out={out}"]) == 0
    info = json.loads((out / "separation.json").read_text())
    assert info["estimate"] == "posterior mean" and info["n_chunks"] == 8
    assert sorted(p.name for p in out.glob("*.wav")) == ["mix.wav", "saw.wav", "sine.wav", "square.wav", "triangle.wav"]


def test_a_flow_posterior_sleeps_on_draws_of_the_noiseless_flow(posterior_run):
    common, root = posterior_run["common"], posterior_run["root"]
    sleep = [*TINY_POSTERIOR, "posterior.sleep_steps=10", "posterior.sleep_draws=6", "posterior.sleep_temperature=0.7",
             "posterior.sources=[sine,square]", "posterior.name=sleep-flow"]
    assert main(["train-posterior", "experiment=toy_flow", *common, *sleep]) == 0
    posterior = root / "toy_flow" / "default" / "posterior" / "sleep-flow"
    assert logged(posterior, "train/sleep_nll") and logged(posterior, "train/mixture")
    banks = sorted((root / "toy_flow" / "default" / "sleep_banks").glob("*.pt"))
    assert len(banks) == 1
    key = json.loads(banks[0].with_suffix(".json").read_text())
    assert key["temperature"] == 0.7 and key["sources"] == ["sine", "square", "saw", "triangle"]
    # The bank is the noiseless flow's exact sampler at the temperature, from the run seed's generator.
    flow = load_prior(root / "toy_flow" / "default" / "noiseless").prior
    config = load_config("toy_flow", "default", [*common, *sleep])
    expected = flow.sample(6, 2 * config.data.crop_length, 0.7, torch.Generator().manual_seed(config.seed + 7919))
    assert torch.allclose(torch.load(banks[0], weights_only=True), expected, atol=1e-5)
