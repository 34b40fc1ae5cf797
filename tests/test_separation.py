"""Separation end to end with tiny trained flow priors: the test loop, its files, DDP sharding, metrics,
and separating a user's file."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from callbacks.separation_report import SeparationReport
from experiments.config import load_config
from experiments.run_layout import experiment_dir
from experiments.separate import run_separation, separate_file
from experiments.train import finetune, train_noiseless
from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[1]
# Three levels, a few steps each: the flow priors at 0.3 and 0.03 come from `nearest`.
SEPARATION = [
    "separation.levels=3", "separation.sigma_max=0.3", "separation.sigma_min=0.03", "separation.steps_per_level=4",
    "separation.n_test=5", "separation.n_chains=3", "separation.batch_size=2", "separation.prior_levels=nearest",
    "separation.n_audio_examples=1", "separation.length=256",
]


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("separation") / "runs"
    overrides = TINY + SEPARATION + [f"output_root={root}"]
    config = load_config("toy_flow", "default", overrides)
    train_noiseless(config)
    finetune(config, 0.3)
    finetune(config, 0.03)
    return overrides


def read_rows(out_dir):
    with open(out_dir / "separation.csv") as stream:
        return list(csv.DictReader(stream))


def test_separation_test_loop_writes_every_result(flow_run):
    results, out_dir = run_separation(load_config("toy_flow", "default", flow_run))
    methods = ["average", "basis", "basis_likelihood_of_3", "basis_oracle_of_3"]
    assert list(results["summary"]) == methods
    rows = read_rows(out_dir)
    assert [(int(r["index"]), r["method"]) for r in rows] == [(i, m) for i in range(5) for m in methods]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["trace"]["level_sigmas"] == [0.3, 0.0949, 0.03]
    assert summary["config"]["prior_sigma_per_level"] == [0.3, 0.3, 0.03]  # nearest in log-sigma
    assert len(summary["trace"]["loglik"]) == 12
    # Scale-invariant metrics of the Average baseline are those of the mix itself: improvement 0.
    assert abs(summary["summary"]["average"]["si_sdri"]) < 1e-6
    # The oracle picks the best chain, so it is never below one sample or the likelihood choice.
    best = summary["summary"]["basis_oracle_of_3"]["si_sdr"]
    assert best >= summary["summary"]["basis"]["si_sdr"] - 1e-9
    assert best >= summary["summary"]["basis_likelihood_of_3"]["si_sdr"] - 1e-9
    for name in ("summary.md", "trace.png", "config.yaml", "wav/00004/mix.wav", "wav/00000/reference_saw.wav",
                 "wav/00003/basis_likelihood_of_3_triangle.wav"):
        assert (out_dir / name).is_file(), name
    audio, rate = soundfile.read(out_dir / "wav/00002/basis_sine.wav")
    assert rate == 16000 and audio.shape == (256,)
    # What W&B receives (offline objects, no network): the tables, the trace and the audio.
    logged = {}

    class Run:
        def log(self, payload):
            logged.update(payload)

    report = SeparationReport(out_dir, 16000)
    report.paths = {"trace": out_dir / "trace.png"}
    report.audio_examples = [(0, {"mix": audio.astype(np.float32)})]
    report.log_to_wandb(results, Run())
    assert {"separation/rows", "separation/summary", "separation/trace", "separation/audio/00000/mix"} <= set(logged)
    assert len(logged["separation/rows"].data) == 20


def test_reported_metrics_equal_museval_and_torchmetrics_on_the_written_audio(flow_run):
    import museval
    from torchmetrics.functional.audio import scale_invariant_signal_distortion_ratio

    config = load_config("toy_flow", "default", flow_run + ["separation.n_test=2", "separation.sources=[sine,saw]"])
    _, out_dir = run_separation(config)
    row = next(r for r in read_rows(out_dir) if r["index"] == "1" and r["method"] == "basis_likelihood_of_3")
    wav = out_dir / "wav" / "00001"
    estimates = np.stack([soundfile.read(wav / f"basis_likelihood_of_3_{s}.wav")[0] for s in ("sine", "saw")])
    references = np.stack([soundfile.read(wav / f"reference_{s}.wav")[0] for s in ("sine", "saw")])
    mix = soundfile.read(wav / "mix.wav")[0]
    si_sdr = scale_invariant_signal_distortion_ratio(torch.from_numpy(estimates), torch.from_numpy(references),
                                                     zero_mean=True)
    mix_si_sdr = scale_invariant_signal_distortion_ratio(torch.from_numpy(mix).expand(2, -1),
                                                         torch.from_numpy(references), zero_mean=True)
    sdr, _, _, _ = museval.evaluate(references[..., None], estimates[..., None], win=256, hop=256)
    for k, source in enumerate(("sine", "saw")):
        assert float(row[f"si_sdr_{source}"]) == pytest.approx(float(si_sdr[k]), abs=1e-3)
        assert float(row[f"si_sdri_{source}"]) == pytest.approx(float(si_sdr[k] - mix_si_sdr[k]), abs=1e-3)
        assert float(row[f"sdr_{source}"]) == pytest.approx(float(np.nanmedian(sdr[k])), abs=1e-3)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "experiments.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_ddp_sharded_separation_covers_each_mixture_once_and_equals_single_process(flow_run):
    config = load_config("toy_flow", "default", flow_run)
    out_dir = experiment_dir(config) / "separation" / "basis_sine-square-saw-triangle"
    args = ["separate", *flow_run, "separation.museval=false", "separation.batch_size=1"]
    single = cli(*args)
    assert single.returncode == 0, single.stderr[-2000:]
    single_rows = read_rows(out_dir)
    # 5 mixtures over 2 ranks: a padding sampler would separate one twice.
    ddp = cli(*args, "trainer.devices=2", "trainer.strategy=ddp")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    ddp_rows = read_rows(out_dir)
    assert sorted(int(r["index"]) for r in ddp_rows if r["method"] == "basis") == list(range(5))
    assert len(ddp_rows) == len(single_rows) == 20
    for a, b in zip(single_rows, ddp_rows):
        assert (a["index"], a["method"], a["chain"]) == (b["index"], b["method"], b["chain"])
        assert float(a["si_sdr"]) == pytest.approx(float(b["si_sdr"]), abs=1e-3)


def write_mix(path, rate=22050, channels=2, seconds=0.1):
    t = np.arange(int(rate * seconds)) / rate
    audio = 0.5 * np.sin(2 * np.pi * 440 * t)
    soundfile.write(path, np.stack([audio] * channels, axis=1), rate)


def test_separate_a_file_resamples_downmixes_and_never_overwrites(flow_run, tmp_path, capsys):
    from experiments.cli import main

    mix = tmp_path / "song.wav"
    write_mix(mix)
    out = tmp_path / "separated"
    config = load_config("toy_flow", "default", flow_run + ["separation.n_chains=2"])
    out_dir, info = separate_file(config, mix, out)
    assert any("downmixed 2 channels" in n for n in info["notes"])
    assert any("resampled from 22050 Hz" in n for n in info["notes"])
    assert info["n_chunks"] == 7  # 1600 samples at 16 kHz in chunks of 256
    for source in ("sine", "square", "saw", "triangle"):
        audio, rate = soundfile.read(out / f"{source}.wav")
        assert rate == 16000 and audio.shape == (1600,) and np.isfinite(audio).all()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code = main(["separate-file", *flow_run, f"mix={mix}", f"out={out}"])
    assert code == 2 and "FORCE=1" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    code = main(["separate-file", *flow_run, f"mix={mix}", f"out={out}", "force=1", "separation.seed=5"])
    assert code == 0
    assert (out / "sine.wav").read_bytes() != before["sine.wav"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".separated")]


@pytest.mark.parametrize("problem, message", [
    ("missing", "does not exist"), ("garbage", "cannot read"), ("empty", "no audio samples"),
    ("nan", "NaN"), ("short", "too short"),
])
def test_bad_mixture_files_are_clear_errors(flow_run, tmp_path, capsys, problem, message):
    from experiments.cli import main

    path = tmp_path / "mix.wav"
    if problem == "garbage":
        path.write_bytes(b"not audio at all")
    elif problem == "empty":
        soundfile.write(path, np.zeros((0, 1)), 16000)
    elif problem == "nan":
        soundfile.write(path, np.full((4000, 1), np.nan), 16000, subtype="FLOAT")
    elif problem == "short":
        write_mix(path, rate=16000, seconds=0.01)
    out = tmp_path / "out"
    code = main(["separate-file", *flow_run, f"mix={path}", f"out={out}"])
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_separation_errors_name_the_fix(flow_run, tmp_path, capsys):
    from experiments.cli import main

    exact = [o for o in flow_run if "prior_levels" not in o]
    code = main(["separate", *exact])
    assert code == 2 and "finetune-noise-all GRID=basis" in capsys.readouterr().err
    code = main(["separate", *flow_run, "separation.sources=[sine,violin]"])
    assert code == 2 and "violin" in capsys.readouterr().err
    code = main(["separate", *flow_run, "separation.algorithm=gibbs"])
    assert code == 2 and "unknown separation.algorithm" in capsys.readouterr().err
    code = main(["separate-file", *flow_run])
    assert code == 2 and "MIX=" in capsys.readouterr().err


def test_a_mulaw_wavenet_is_refused_for_langevin(tmp_path, capsys):
    from experiments.cli import main
    from tests.conftest import TINY_WAVENET

    overrides = TINY_WAVENET + [f"output_root={tmp_path}", "trainer.max_steps=2", "trainer.val_check_interval=2",
                                "separation.prior_levels=nearest"]
    train_noiseless(load_config("toy_wavenet", "default", overrides))
    code = main(["separate", "experiment=toy_wavenet", *overrides])
    assert code == 2 and "model.likelihood=smoothed" in capsys.readouterr().err
    assert not (tmp_path / "toy_wavenet" / "default" / "separation").exists()


def test_a_smoothed_wavenet_separates_through_the_same_loop(tmp_path):
    from tests.conftest import TINY_WAVENET

    overrides = TINY_WAVENET + SEPARATION + [
        f"output_root={tmp_path}", "model.likelihood=smoothed", "trainer.max_steps=4", "trainer.val_check_interval=2",
        "separation.n_test=2", "separation.steps_per_level=2", "separation.museval=false"]
    config = load_config("toy_wavenet", "default", overrides)
    train_noiseless(config)
    results, out_dir = run_separation(config)
    assert results["count"] == 2 and results["summary"]["basis"]["count"] == 2
    assert all(np.isfinite(r["si_sdr"]) for r in results["rows"])
    assert results["nonfinite_prior_gradients"] == 0
