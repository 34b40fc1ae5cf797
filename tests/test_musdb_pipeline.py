"""The musdb experiment end to end on a tiny generated MUSDB18-HQ root: train the four priors, then the
cross-likelihood matrix; and a missing dataset root stops the command line with exit 2, writing nothing."""
import json

from datamodules.synthetic_layouts import write_musdb_hq
from experiments.cli import main
from tests.conftest import TINY


def test_train_and_cross_likelihood_on_musdb(tmp_path, capsys):
    root = write_musdb_hq(tmp_path / "musdb", n_train=3, n_test=2, seconds=2.0)
    args = ["experiment=musdb_flow", f"output_root={tmp_path / 'runs'}", f"data.root={root}",
            "data.frames_per_song=20", *TINY]
    assert main(["train", *args]) == 0
    run = tmp_path / "runs" / "musdb_flow" / "default"
    assert (run / "noiseless" / "done.json").is_file()
    config = (run / "noiseless" / "config.yaml").read_text()
    assert "name: musdb18" in config and str(root) in config
    assert main(["cross-likelihood", *args]) == 0
    results = json.loads((run / "cross_likelihood" / "cross_likelihood.json").read_text())
    assert results["sources"] == ["drums", "bass", "other", "vocals"]
    matrix = results["matrices"][0]["loglik"]
    assert len(matrix) == 4 and all(len(row) == 4 for row in matrix)
    assert (tmp_path / "runs" / "stem_cache").is_dir()


def test_missing_musdb_root_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MUSDB_ROOT", raising=False)
    code = main(["train", "experiment=musdb_flow", f"output_root={tmp_path}", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "MUSDB_ROOT" in err and "Expected layout" in err
    assert not any(tmp_path.iterdir())
