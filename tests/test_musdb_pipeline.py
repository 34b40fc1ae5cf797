"""The musdb experiment end to end on a tiny generated MUSDB18-HQ root: train the four priors, then the
cross-likelihood matrix; and a missing dataset root stops the command line with exit 2, writing nothing."""
import json

import pytest

from datamodules.synthetic_layouts import write_musdb_hq
from experiments.cli import main
from tests.conftest import TINY, TINY_POSTERIOR


def test_train_and_cross_likelihood_on_musdb(tmp_path, capsys):
    root = write_musdb_hq(tmp_path / "musdb", n_train=3, n_test=2, seconds=2.0)
    args = ["experiment=musdb_flow", f"output_root={tmp_path / 'runs'}", f"data.root={root}",
            "data.frames_per_song=20", *TINY]
    assert main(["train", *args]) == 0
    run = tmp_path / "runs" / "musdb_flow" / "default"
    assert (run / "noiseless" / "done.json").is_file()
    config = (run / "noiseless" / "config.yaml").read_text()
    assert "name: musdb18" in config and str(root) in config
    # The pooled prior of the four stems, for the discrimination report's ratio score.
    assert main(["train-pooled", *args, "sigma=0.077", "finetune.max_steps=4"]) == 0
    assert main(["cross-likelihood", *args]) == 0
    results = json.loads((run / "cross_likelihood" / "cross_likelihood.json").read_text())
    assert results["sources"] == ["drums", "bass", "other", "vocals"]
    matrix = results["matrices"][0]["loglik"]
    assert len(matrix) == 4 and all(len(row) == 4 for row in matrix)
    assert (tmp_path / "runs" / "stem_cache").is_dir()
    # The discrimination report on any dataset root.
    assert json.loads((run / "pooled" / "noiseless" / "done.json").read_text())["pooled_sources"] == results["sources"]
    report = json.loads((run / "cross_likelihood" / "discrimination.json").read_text())
    assert report["sources"] == results["sources"] and report["coder"]["sample_rate"] == 16000
    assert set(report["levels"][0]["ratio"]["auroc"]) == set(results["sources"])
    # The variational posterior trains on random sums of stems from different songs (sum mixing) and separates.
    assert main(["train-posterior", *args, *TINY_POSTERIOR, "posterior.max_steps=4", "posterior.val_check_interval=2"]) == 0
    source = json.loads((run / "posterior" / "drums-bass-other-vocals" / "posterior_source.json").read_text())
    assert source["sources"] == ["drums", "bass", "other", "vocals"]
    assert main(["separate", *args, "separation.algorithm=variational", "separation.n_test=2",
                 "separation.museval=false", "separation.length=256"]) == 0
    summary = json.loads((run / "separation" / "variational_drums-bass-other-vocals" / "summary.json").read_text())
    assert summary["mixing"]["kind"] == "sum" and "variational_mean" in summary["summary"]


def test_missing_musdb_root_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MUSDB_ROOT", raising=False)
    code = main(["train", "experiment=musdb_flow", f"output_root={tmp_path}", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "MUSDB_ROOT" in err and "Expected layout" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow  # DDP equality of the cross-likelihood runs in make test (test_pipeline); the cache: test_musdb_data
def test_ddp_cross_likelihood_builds_the_cache_once_and_equals_single_process(tmp_path):
    import shutil
    import subprocess
    import sys

    import torch

    root = write_musdb_hq(tmp_path / "musdb", n_train=3, n_test=3, seconds=2.0)
    runs = tmp_path / "runs"
    args = ["experiment=musdb_flow", f"output_root={runs}", f"data.root={root}", "data.frames_per_song=10", *TINY,
            "data.n_test=9", "cross_likelihood.n_test=9", "trainer.max_steps=10"]
    assert main(["train", *args]) == 0
    assert main(["cross-likelihood", *args]) == 0
    out = runs / "musdb_flow" / "default" / "cross_likelihood" / "cross_likelihood.json"
    single = json.loads(out.read_text())
    shutil.rmtree(runs / "stem_cache")  # both ranks now find an empty cache
    ddp = subprocess.run([sys.executable, "-m", "experiments.cli", "cross-likelihood", *args, "trainer.devices=2",
                          "trainer.strategy=ddp", "data.eval_batch_size=2"], capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert len(list((runs / "stem_cache").glob("*.npy"))) == 3  # one entry per test song, none half-written
    assert len(list((runs / "stem_cache").glob("*.json"))) == 3
    sharded = json.loads(out.read_text())
    assert sharded["count"] == single["count"] == 9  # 9 frames over 2 ranks, none counted twice
    assert torch.allclose(torch.tensor(sharded["matrices"][0]["loglik"], dtype=torch.float64),
                          torch.tensor(single["matrices"][0]["loglik"], dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_musdb_presets_have_the_papers_sizes():
    from experiments.config import load_config

    flow = load_config("musdb_flow", "paper")
    assert (flow.model.n_blocks, flow.model.n_flows, flow.model.n_layers, flow.model.width) == (8, 6, 10, 48)
    assert (flow.data.batch_size, flow.data.crop_length, flow.data.frames_per_song) == (2, 16384, 150)
    assert flow.data.name == "musdb18" and flow.data.sample_rate == 16000 and flow.data.max_tracks is None
    wavenet = load_config("musdb_wavenet", "paper")
    assert (wavenet.model.n_blocks, wavenet.model.n_layers, wavenet.model.width) == (3, 10, 256)
    assert wavenet.data.batch_size == 2 and wavenet.model.likelihood == "mulaw"
    default = load_config("musdb_flow", "default")
    assert default.data.max_tracks == 4 and default.data.crop_length == 2048
    slakh = load_config("slakh_flow", "default")
    assert slakh.data.sample_rate == 22050 and list(slakh.data.sources) == ["drums", "bass", "guitar", "piano"]


def test_musdb_wavenet_experiment_trains(tmp_path):
    from tests.conftest import TINY_WAVENET

    root = write_musdb_hq(tmp_path / "musdb", n_train=2, n_test=1, seconds=1.0)
    args = ["experiment=musdb_wavenet", f"output_root={tmp_path / 'runs'}", f"data.root={root}", *TINY_WAVENET,
            "trainer.max_steps=4", "trainer.val_check_interval=2", "data.frames_per_song=16"]
    assert main(["train", *args]) == 0
    done = json.loads((tmp_path / "runs" / "musdb_wavenet" / "default" / "noiseless" / "done.json").read_text())
    assert done["global_step"] == 4
