"""make tune-sampler: candidates separate validation mixtures (never the test set) and are ranked in a table."""
import json

import torch

from datamodules.registry import build_datamodule
from experiments.config import load_config
from experiments.tune_sampler import main
from tests.conftest import TINY_SCORE


def test_the_test_loop_can_run_on_the_validation_split():
    data = load_config("toy_flow", "default", ["data.n_val=3", "data.n_test=3", "data.eval_length=64"]).data
    datamodule = build_datamodule(data)
    test = next(iter(datamodule.test_dataloader()))["sources"]
    datamodule.test_split = "val"
    val = next(iter(datamodule.test_dataloader()))["sources"]
    assert torch.equal(val, next(iter(datamodule.val_dataloader()))["sources"]) and not torch.equal(val, test)


def test_tune_sampler_ranks_candidates_on_validation_mixtures(tmp_path, capsys):
    from experiments.cli import main as cli

    common = TINY_SCORE + [f"output_root={tmp_path}"]
    assert cli(["train", "experiment=toy_score", *common, "trainer.max_steps=4", "trainer.val_check_interval=4"]) == 0
    assert main(["experiment=toy_score", "candidates=default,dirac", "sets=sine-square", *common,
                 "separation.n_test=2", "separation.length=256", "separation.diffusion_steps=3"]) == 0
    run = tmp_path / "toy_score" / "default"
    rows = json.loads((run / "sampler_search" / "search.json").read_text())
    assert [row["candidate"] for row in rows] == ["default", "dirac"]
    summary = json.loads((run / "separation" / "search_dirac_sine-square" / "summary.json").read_text())
    assert summary["config"]["separation"]["split"] == "val" and summary["count"] == 2
    assert summary["config"]["separation"]["diffusion_constraint"] == "dirac"
    assert rows[1]["sine-square"] == summary["summary"]["diffusion"]["si_sdri"]
    table = (run / "sampler_search" / "search.md").read_text()
    assert "| dirac |" in table and "first 2 validation mixtures of 256 samples" in table
