"""What a user types can neither delete their runs nor write outside the output root, and is checked before any
training or separation starts: FORCE replaces only an earlier separation, names are single path components,
make passes values as single arguments, and damaged or foreign checkpoints are named with what to do."""
import errno
import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from experiments.cli import main
from experiments.run_layout import mark_done
from tests.conftest import TINY, TINY_SCORE

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys, *args):
    code = main(list(args))
    return code, capsys.readouterr().err


def tree(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


@pytest.fixture
def mix(tmp_path):
    path = tmp_path / "mix.wav"
    soundfile.write(path, 0.1 * np.ones((4000, 1)), 16000)
    return path


def common(tmp_path, *extra):
    return ["experiment=toy_flow", f"output_root={tmp_path / 'runs'}", *TINY, *extra]


def test_force_refuses_a_folder_that_holds_no_separation(tmp_path, mix, capsys):
    run = tmp_path / "runs" / "toy_flow" / "default"
    (run / "noiseless").mkdir(parents=True)
    (run / "noiseless" / "last.ckpt").write_bytes(b"trained prior")
    (run / "unrelated.txt").write_text("keep me")
    before = tree(tmp_path)
    code, err = run_cli(capsys, "separate-file", *common(tmp_path), f"mix={mix}", f"out={run}", "force=1")
    assert code == 2 and "does not hold a separation" in err
    assert tree(tmp_path) == before and (run / "unrelated.txt").read_text() == "keep me"
    code, err = run_cli(capsys, "separate-file", *common(tmp_path), f"mix={mix}", f"out={tmp_path / 'runs'}", "force=1")
    assert code == 2 and tree(tmp_path) == before


def test_force_refuses_an_earlier_separation_with_foreign_files(tmp_path, mix, capsys):
    out = tmp_path / "separated"
    out.mkdir()
    (out / "separation.json").write_text(json.dumps({"sources": ["sine", "square"]}))
    for name in ("sine.wav", "square.wav", "mix.wav", "my_notes.txt"):
        (out / name).write_text(name)
    code, err = run_cli(capsys, "separate-file", *common(tmp_path), f"mix={mix}", f"out={out}", "force=1")
    assert code == 2 and "my_notes.txt" in err
    assert len(list(out.iterdir())) == 5


@pytest.mark.parametrize("override", [
    "run_name=../../../escaped", "separation.name=../../../../x", "posterior.name=../p", "separation.posterior=a/b",
    "data.sources=[sine,../x]", "separation.sources=[sine,..]", "posterior.sources=[sine,/tmp]",
])
def test_names_that_become_folders_are_single_components(tmp_path, capsys, override):
    code, err = run_cli(capsys, "train", *common(tmp_path, override))
    assert code == 2 and "one path component" in err
    assert not tmp_path.joinpath("runs").exists() and not list(tmp_path.parent.glob("escaped"))


def test_unknown_separation_source_stops_before_training(tmp_path, capsys):
    code, err = run_cli(capsys, "train", *common(tmp_path, "separation.sources=[sine,flute]"))
    assert code == 2 and "flute" in err and "choose from" in err
    assert not tmp_path.joinpath("runs").exists()


@pytest.mark.parametrize("key", ["trainer.max_steps", "finetune.max_steps", "lqvae.max_steps", "posterior.max_steps"])
def test_non_positive_step_counts_are_refused(tmp_path, capsys, key):
    code, err = run_cli(capsys, "train", *common(tmp_path, f"{key}=0"))
    assert code == 2 and key in err and "positive" in err
    assert not tmp_path.joinpath("runs").exists()


def test_an_override_that_is_not_yaml_is_named(tmp_path, capsys):
    code, err = run_cli(capsys, "separate", *common(tmp_path, "separation.sources=[sine,,square]"))
    assert code == 2 and "separation.sources=[sine,,square]" in err and "Traceback" not in err


def test_output_that_is_a_file_or_holds_the_repo_is_refused_before_loading_priors(tmp_path, mix, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    code, err = run_cli(capsys, "separate-file", *common(tmp_path), f"mix={mix}", f"out={a_file}", "force=1")
    assert code == 2 and "is a file" in err and a_file.read_text() == "mine"
    cwd = os.getcwd()
    try:
        os.chdir(REPO)
        code, err = run_cli(capsys, "separate-file", *common(tmp_path), f"mix={mix}", "out=.", "force=1")
    finally:
        os.chdir(cwd)
    assert code == 2 and "does not hold a separation" in err and (REPO / "Makefile").is_file()


def test_an_unwritable_output_is_refused_before_loading_priors(tmp_path, mix, capsys, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    code, err = run_cli(capsys, "separate-file", *common(tmp_path), f"mix={mix}", f"out={tmp_path / 'new'}")
    assert code == 2 and "cannot write" in err and "Read-only file system" in err


def test_an_empty_mixture_file_says_it_is_empty(tmp_path, capsys):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    code, err = run_cli(capsys, "separate-file", *common(tmp_path), f"mix={empty}", f"out={tmp_path / 'out'}")
    assert code == 2 and "is empty (0 bytes)" in err


def truncated_checkpoint(run_dir):
    run_dir.mkdir(parents=True)
    full = run_dir / "full.ckpt"
    torch.save({"hyper_parameters": {}, "state_dict": {"w": torch.zeros(1000)}}, full)
    (run_dir / "last.ckpt").write_bytes(full.read_bytes()[:500])
    full.unlink()


def test_a_truncated_checkpoint_is_named_on_resume_and_on_separate(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "toy_flow" / "default" / "noiseless"
    truncated_checkpoint(run_dir)
    (run_dir / "logs").mkdir()
    (run_dir / "logs" / "metrics.csv").write_text("step\n1\n")
    for _ in range(2):  # a refused resume leaves the logs as they were, however often it is retried
        code, err = run_cli(capsys, "train", *common(tmp_path))
        assert code == 2 and str(run_dir / "last.ckpt") in err and "delete it to retrain" in err
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["metrics.csv"]
    mark_done(run_dir, {"global_step": 60})
    code, err = run_cli(capsys, "separate", *common(tmp_path, "separation.algorithm=diffusion"))
    assert code == 2 and "delete it to retrain" in err and "Traceback" not in err


def test_a_checkpoint_of_another_family_leads_with_the_families(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "toy_score" / "default" / "noiseless"
    run_dir.mkdir(parents=True)
    hparams = {"model": {"name": "flowavenet", "n_blocks": 2}, "sources": ["sine", "square", "saw", "triangle"]}
    torch.save({"hyper_parameters": hparams, "state_dict": {}}, run_dir / "last.ckpt")
    mark_done(run_dir, {"global_step": 60})
    args = ["experiment=toy_score", f"output_root={tmp_path / 'runs'}", *TINY_SCORE, "separation.algorithm=diffusion"]
    code, err = run_cli(capsys, "separate", *args)
    assert code == 2
    assert err.startswith("error: checkpoint") and "this run holds a flowavenet prior, the experiment expects score" in err


def make_args(tmp_path, **values):
    recorder = tmp_path / "venv" / "bin" / "python"
    recorder.parent.mkdir(parents=True, exist_ok=True)
    recorder.write_text("#!/usr/bin/env python3\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    recorder.chmod(0o755)
    command = ["make", "-s", "-C", str(REPO), f"VENV={tmp_path / 'venv'}"]
    command += [f"{key}={value}" for key, value in values.items() if key != "target"] + [values["target"]]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_make_passes_user_values_as_single_arguments(tmp_path):
    weird = str(tmp_path / "my songs; touch INJECTED; 'it\"s'.wav")
    calls = make_args(tmp_path, target="separate", MIX=weird, OUT="out dir;rm -rf x", SOURCES="sine,square",
                      ARGS="run_name=a separation.n_test=[1,2]")
    assert calls == [["-m", "experiments.cli", "separate-file", "experiment=toy_flow", "preset=default",
                      "output_root=runs", f"mix={weird}", "out=out dir;rm -rf x", "force=",
                      "separation.sources=[sine,square]", "run_name=a", "separation.n_test=[1,2]"]]
    assert not list(tmp_path.rglob("INJECTED"))
    calls = make_args(tmp_path, target="finetune-noise", SIGMA="0.1;touch INJECTED", RUNS="my runs")
    assert "sigma=0.1;touch INJECTED" in calls[0] and "output_root=my runs" in calls[0]
    calls = make_args(tmp_path, target="separate-toy", SOURCES="sine,flute")
    assert len(calls) == 3 and all("separation.sources=[sine,flute]" in call for call in calls)
    assert not list(tmp_path.rglob("INJECTED"))


def test_fp16_for_grouped_priors_is_refused_before_anything_is_written(tmp_path, capsys):
    code, err = run_cli(capsys, "train", *common(tmp_path), "preset=fp16")
    assert code == 2 and "bf16" in err and "couples" in err
    assert not tmp_path.joinpath("runs").exists()
