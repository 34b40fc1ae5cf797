"""Separation end to end with tiny trained flow priors: the test loop, its files, DDP sharding, metrics
checked against independent computations, which prior directory serves each level, the mixing taken from
the dataset, separating a user's file, the diffusion sampler through the same loop, and a noise-conditional
score family serving every level from its one run."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from callbacks.separation_report import SeparationReport
from datamodules.registry import build_datamodule, dataset_mixing
from experiments.config import ConfigError, load_config
from experiments.run_layout import experiment_dir, load_prior, mark_done, prior_dir
from experiments.separate import build_separator, output_name, run_separation
from experiments.separate_file import separate_file
from experiments.train import finetune, train_noiseless
from lightning_modules.separation import SEED_STRIDE
from lightning_modules.metrics.separation_metrics import bss_sdr, windowed_si_sdri
from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[1]
# Three levels (0.3, 0.0949, 0.03), a few steps each, the priors from `nearest` unless a test says otherwise.
SEPARATION = [
    "separation.levels=3", "separation.sigma_max=0.3", "separation.sigma_min=0.03", "separation.steps_per_level=4",
    "separation.n_test=5", "separation.n_chains=3", "separation.batch_size=2", "separation.prior_levels=nearest",
    "separation.n_audio_examples=1", "separation.length=256",
]


def stand_in_level(config, sigma, grid, scale):
    """A finished level without the ~40 s of a fine-tuning: the noiseless checkpoint with its weights
    scaled by ``scale``, so that every directory holds a prior of its own that a test can recognise."""
    checkpoint = torch.load(prior_dir(config, 0.0) / "last.ckpt", map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["noise_sigma"] = sigma
    state = checkpoint["state_dict"]
    checkpoint["state_dict"] = {k: v * scale if v.is_floating_point() else v for k, v in state.items()}
    directory = prior_dir(config, sigma, grid)
    directory.mkdir(parents=True)
    torch.save(checkpoint, directory / "last.ckpt")
    mark_done(directory, {"noise_sigma": sigma, "stand_in": True})


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    """Noiseless priors; make finetune-noise's layout at 0.3 (trained) and 0.03; the BASIS grid's layout at
    0.0949 and 0.03 (trained). So `nearest` takes 0.3 from the one layout and 0.0949 from the other, and
    0.03, finished in both, from the BASIS grid; `exact` BASIS finds no 0.3 in the BASIS grid."""
    root = tmp_path_factory.mktemp("separation") / "runs"
    overrides = TINY + SEPARATION + [f"output_root={root}"]
    config = load_config("toy_flow", "default", overrides)
    train_noiseless(config)
    finetune(config, 0.3)
    finetune(config, 0.03, grid="basis")
    stand_in_level(config, 0.03, "paper003", 1.01)
    stand_in_level(config, 0.0949, "basis", 1.02)
    return overrides


@pytest.fixture(scope="module")
def main_run(flow_run):
    return run_separation(load_config("toy_flow", "default", flow_run))


def read_rows(out_dir):
    with open(out_dir / "separation.csv") as stream:
        return list(csv.DictReader(stream))


def read_wav(path):
    return soundfile.read(path, dtype="float64")[0]


def si_sdr_from_correlation(estimate, reference):
    """Zero-mean SI-SDR in closed form: with rho the correlation of the two, 10 log10(rho^2 / (1 - rho^2))."""
    rho = np.corrcoef(estimate, reference)[0, 1]
    return 10 * np.log10(rho**2 / (1 - rho**2))


def test_separation_test_loop_writes_every_result(flow_run, main_run):
    results, out_dir = main_run
    methods = ["average", "basis", "basis_selected_of_3", "basis_oracle_of_3", "basis_consensus_of_3"]
    assert list(results["summary"]) == methods
    rows = read_rows(out_dir)
    assert [(int(r["index"]), r["method"]) for r in rows] == [(i, m) for i in range(5) for m in methods]
    assert "si_sdri_windowed" not in rows[0]  # the full protocol unless asked
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["trace"]["level_sigmas"] == [0.3, 0.0949, 0.03]
    assert summary["trace"]["step_sigmas"] == [s for s in (0.3, 0.0949, 0.03) for _ in range(4)]
    assert len(summary["trace"]["loglik"]) == 12 and all(np.isfinite(summary["trace"]["loglik"]))
    assert summary["selection"] == "log_prob"
    # Wall time per second of separated audio: 5 mixtures of 256 samples at 16 kHz.
    assert summary["seconds_per_audio_second"] == pytest.approx(summary["seconds"] / (5 * 256 / 16000))
    # The toy data's mix is the mean of its sources, and the loop says so.
    assert summary["mixing"] == summary["config"]["mixing"] == {"kind": "mean", "alpha": [0.25] * 4,
                                                                 "from": "data.name=toy"}
    assert "Mixing: mean" in (out_dir / "summary.md").read_text()
    for name in ("summary.md", "trace.png", "config.yaml", "wav/00004/mix.wav", "wav/00000/reference_saw.wav",
                 "wav/00003/basis_selected_of_3_triangle.wav", "wav/00001/average_sine.wav"):
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
    assert len(logged["separation/rows"].data) == 25


def test_nearest_levels_come_from_either_layout_and_are_recorded_with_their_directories(flow_run, main_run):
    config = load_config("toy_flow", "default", flow_run)
    recorded = json.loads((main_run[1] / "summary.json").read_text())["config"]
    assert recorded["prior_sigma_per_level"] == [0.3, 0.0949, 0.03]
    # 0.03 is finished in both layouts: BASIS takes its own grid's.
    assert recorded["prior_dir_per_level"] == [str(prior_dir(config, 0.3)), str(prior_dir(config, 0.0949, "basis")),
                                               str(prior_dir(config, 0.03, "basis"))]
    assert recorded["prior_grid_per_level"] == ["paper003", "basis", "basis"]
    assert recorded["selection_prior_dir"] == str(prior_dir(config, 0.03, "basis"))


def chains_of(config, out_dir, index):
    """Every chain of mixture ``index`` again (the sampler is seeded per mixture, whatever the batching),
    with the mixture and references read back from the written WAVs."""
    wav = out_dir / "wav" / f"{index:05d}"
    sources = list(config.data.sources)
    mix = torch.from_numpy(read_wav(wav / "mix.wav")).float()
    references = np.stack([read_wav(wav / f"reference_{s}.wav") for s in sources])
    separator = build_separator(config)[0]
    samples, _ = separator(mix.unsqueeze(0), config.separation.n_chains, [config.separation.seed * SEED_STRIDE + index])
    return samples[0].detach(), references, wav


def test_oracle_and_likelihood_choices_equal_an_independent_recomputation(flow_run, main_run):
    config = load_config("toy_flow", "default", flow_run)
    rows = read_rows(main_run[1])
    # The selection prior, loaded here from where the lowest level's prior must be: the BASIS grid's 0.03.
    selection = load_prior(prior_dir(config, 0.03, "basis")).prior
    for index in range(5):
        samples, references, wav = chains_of(config, main_run[1], index)
        chosen = {r["method"]: r for r in rows if int(r["index"]) == index}
        oracle = chosen["basis_oracle_of_3"]
        # The rerun chains are the loop's: its written oracle estimate is one of them.
        written = np.stack([read_wav(wav / f"basis_oracle_of_3_{s}.wav") for s in config.data.sources])
        np.testing.assert_allclose(written, samples[int(oracle["chain"])].double().numpy(), atol=1e-4)
        scores = np.array([[si_sdr_from_correlation(chain[k].double().numpy(), references[k]) for k in range(4)]
                           for chain in samples])  # [C, N]
        means = scores.mean(axis=1)
        assert np.ptp(means) > 0.01  # the chains differ, so the choice means something
        # The chosen chain is the best one (up to float noise between two equally good ones).
        assert means[int(oracle["chain"])] >= means.max() - 1e-4
        assert float(oracle["si_sdr"]) == pytest.approx(means.max(), abs=1e-3)
        with torch.no_grad():
            loglik = selection.log_prob(samples).mean(dim=1)  # [C]: nats per sample, averaged over sources
        assert loglik[int(chosen["basis_selected_of_3"]["chain"])] >= loglik.max() - 1e-5, loglik
        assert int(chosen["basis"]["chain"]) == 0


def test_average_baseline_value_scale_and_museval_sdr(flow_run):
    """Two sources, explicit weights alpha = (0.25, 1): Average = m (1/N) / alpha_k = (2 m, m / 2)."""
    config = load_config("toy_flow", "default", flow_run + [
        "separation.n_test=2", "separation.sources=[sine,saw]", "separation.mixing_weights=[0.25,1.0]"])
    results, out_dir = run_separation(config)
    assert results["mixing"] == {"kind": "weights", "alpha": [0.25, 1.0], "from": "separation.mixing_weights"}
    rows = read_rows(out_dir)
    for index in range(2):
        wav = out_dir / "wav" / f"{index:05d}"
        mix = read_wav(wav / "mix.wav")
        average = {s: read_wav(wav / f"average_{s}.wav") for s in ("sine", "saw")}
        np.testing.assert_allclose(average["sine"], 2 * mix, atol=1e-6)
        np.testing.assert_allclose(average["saw"], mix / 2, atol=1e-6)
        row = {r["method"]: r for r in rows if int(r["index"]) == index}
        for source in ("sine", "saw"):
            reference = read_wav(wav / f"reference_{source}.wav")
            of_mix = si_sdr_from_correlation(mix, reference)
            assert float(row["average"][f"si_sdr_{source}"]) == pytest.approx(of_mix, abs=1e-3)
            # Every improvement is over the mix's own SI-SDR.
            sample = read_wav(wav / f"basis_{source}.wav")
            assert float(row["basis"][f"si_sdri_{source}"]) == pytest.approx(
                si_sdr_from_correlation(sample, reference) - of_mix, abs=1e-3)
        # SDR (BSSEval v4) is not scale invariant: the Average's depends on the scale convention.
        references = torch.from_numpy(np.stack([read_wav(wav / f"reference_{s}.wav") for s in ("sine", "saw")]))
        estimate = torch.from_numpy(np.stack([average["sine"], average["saw"]]))
        reported = torch.tensor([float(row["average"][f"sdr_{s}"]) for s in ("sine", "saw")], dtype=torch.float64)
        assert torch.allclose(reported, bss_sdr(estimate, references, 16000), atol=1e-3)
        assert ((bss_sdr(4 * estimate, references, 16000) - reported).abs() > 1.0).all()


def test_windowed_protocol_adds_columns_and_leaves_the_others_alone(flow_run, main_run):
    # 64-sample windows, hop 32, in 256-sample items: 7 windows each.
    config = load_config("toy_flow", "default", flow_run + [
        "separation.n_test=2", "separation.protocol=windowed", "separation.name=windowed",
        f"separation.window_seconds={64 / 16000}", f"separation.hop_seconds={32 / 16000}"])
    results, out_dir = run_separation(config)
    rows, full = read_rows(out_dir), read_rows(main_run[1])[:10]
    for row, before in zip(rows, full, strict=True):
        assert (row["index"], row["method"], row["chain"]) == (before["index"], before["method"], before["chain"])
        for key in before:
            if key.startswith(("si_sdr", "sdr")):
                assert float(row[key]) == pytest.approx(float(before[key]), abs=1e-4), key
        wav = out_dir / "wav" / f"{int(row['index']):05d}"
        tracks = {name: torch.from_numpy(np.stack([read_wav(wav / f"{name}_{s}.wav") for s in config.data.sources]))
                  for name in ("reference", row["method"])}
        references, estimates = tracks["reference"], tracks[row["method"]]
        mix = torch.from_numpy(read_wav(wav / "mix.wav"))
        expected, kept, total = windowed_si_sdri(estimates, references, mix, 64, 32)
        assert (int(row["windows_kept"]), int(row["windows"])) == (kept, total) and total == 7
        for k, source in enumerate(config.data.sources):
            assert float(row[f"si_sdri_windowed_{source}"]) == pytest.approx(float(expected[k]), abs=1e-3)
    # The summary is a mean over every kept window of every mixture.
    for method, stats in results["summary"].items():
        mine = [r for r in rows if r["method"] == method]
        weights = np.array([int(r["windows_kept"]) for r in mine])
        values = np.array([float(r["si_sdri_windowed"]) for r in mine])
        assert stats["si_sdri_windowed"] == pytest.approx((weights * values).sum() / weights.sum(), abs=1e-6)
        assert stats["windows_kept"] == weights.sum()
    assert "SI-SDRi windowed" in (out_dir / "summary.md").read_text()


def cli(*args):
    return subprocess.run([sys.executable, "-m", "experiments.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


# The diffusion variant runs with make test-slow (the suite's 10-minute budget); basis covers the sharding here.
@pytest.mark.parametrize("algorithm", ["basis", pytest.param("diffusion", marks=pytest.mark.slow)])
def test_ddp_sharded_separation_covers_each_mixture_once_and_equals_single_process(flow_run, algorithm):
    config = load_config("toy_flow", "default", flow_run)
    out_dir = experiment_dir(config) / "separation" / f"ddp_{algorithm}"
    args = ["separate", *flow_run, *(DIFFUSION if algorithm == "diffusion" else []), "separation.museval=false",
            "separation.batch_size=1", f"separation.name=ddp_{algorithm}"]
    single = cli(*args)
    assert single.returncode == 0, single.stderr[-2000:]
    single_rows = read_rows(out_dir)
    # 5 mixtures over 2 ranks: a padding sampler would separate one twice.
    ddp = cli(*args, "trainer.devices=2", "trainer.strategy=ddp")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    ddp_rows = read_rows(out_dir)
    assert sorted(int(r["index"]) for r in ddp_rows if r["method"] == algorithm) == list(range(5))
    assert len(ddp_rows) == len(single_rows) == 25
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
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # the user's usual mode, not mkdtemp's private one
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
    # separation.mixture_consistency: the written sources mix back to the (resampled) file exactly.
    consistent = load_config("toy_flow", "default", flow_run + ["separation.n_chains=2",
                                                                 "separation.mixture_consistency=true"])
    _, projected = separate_file(consistent, mix, tmp_path / "consistent")
    assert info["mix_error"] > 1e-6 and not info["mixture_consistency"]
    assert projected["mix_error"] < 1e-12 and projected["mixture_consistency"]
    # separation.wiener_fft: refiltered from the file's STFT, they mix back too.
    wiener = load_config("toy_flow", "default", flow_run + ["separation.n_chains=2", "separation.wiener_fft=256"])
    _, filtered = separate_file(wiener, mix, tmp_path / "wiener")
    assert filtered["mix_error"] < 1e-12 and filtered["wiener_fft"] == 256 and info["wiener_fft"] == 0


def test_make_separate_takes_paths_with_spaces_quotes_and_semicolons(flow_run, tmp_path):
    folder = tmp_path / "my songs; touch INJECTED; 'x\"y'"
    folder.mkdir()
    mix, out = folder / "a song.wav", folder / "separated; rm -rf ~"
    write_mix(mix, rate=16000, channels=1)
    overrides = [o for o in flow_run if not o.startswith("output_root=")] + ["separation.n_chains=1"]
    root = next(o for o in flow_run if o.startswith("output_root=")).partition("=")[2]
    command = ["make", "-s", "-C", str(REPO), "separate", f"VENV={Path(sys.executable).parents[1]}", f"MIX={mix}",
               f"OUT={out}", f"RUNS={root}", "ARGS=" + " ".join(overrides)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "separation.json").read_text())["input"] == str(mix)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["mix.wav", "separation.json", "config.yaml"] + [f"{s}.wav" for s in ("sine", "square", "saw", "triangle")])
    assert not list(tmp_path.rglob("INJECTED")) and not list(REPO.glob("INJECTED"))


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


@pytest.fixture(scope="module")
def exact_run(flow_run, tmp_path_factory):
    """flow_run's priors copied, plus a BASIS-grid prior at 0.3: every level of the BASIS grid is finished."""
    config = load_config("toy_flow", "default", flow_run)
    root = tmp_path_factory.mktemp("exact") / "runs"
    shutil.copytree(config.output_root, root, ignore=shutil.ignore_patterns("separation"))
    overrides = flow_run + [f"output_root={root}", "separation.prior_levels=exact"]
    stand_in_level(load_config("toy_flow", "default", overrides), 0.3, "basis", 1.03)
    return overrides


def state_of(directory):
    state = torch.load(Path(directory) / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("prior."): v for k, v in state.items()}


def test_exact_levels_use_the_priors_fine_tuned_at_exactly_those_sigmas_in_the_basis_grid(exact_run):
    config = load_config("toy_flow", "default", exact_run)
    separator, selection, _, record = build_separator(config)
    assert separator.score_model.sigmas == [0.3, 0.0949, 0.03]
    sigmas = [0.3, 0.0949, 0.03]
    directories = [prior_dir(config, s, "basis") for s in sigmas]
    assert record["prior_sigma_per_level"] == sigmas and [lv.sigma for lv in separator.levels] == sigmas
    assert record["prior_dir_per_level"] == [str(d) for d in directories]
    assert record["selection_prior_dir"] == str(directories[-1])
    states = [state_of(d) for d in directories]
    # The directories hold different priors (so the check below can tell them apart), none of them the
    # prior that make finetune-noise wrote at 0.3.
    paper003 = state_of(prior_dir(config, 0.3))
    for a in range(3):
        assert any(not torch.equal(states[a][k], paper003[k]) for k in paper003)
        for b in range(a):
            assert any(not torch.equal(states[a][k], states[b][k]) for k in states[a])
    for level, state in zip(separator.score_model.priors, states):
        loaded = level.prior.state_dict()
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert selection is separator.score_model.priors[-1]


def test_a_missing_basis_level_is_a_clear_error_even_when_make_finetune_noise_has_it(flow_run):
    config = load_config("toy_flow", "default", [*flow_run, "separation.prior_levels=exact"])
    with pytest.raises(FileNotFoundError) as error:
        build_separator(config)
    message = str(error.value)
    assert "sigma [0.3] in the BASIS grid" in message and "make finetune-noise-all GRID=basis" in message
    assert "separation.levels" in message  # these levels are not the default grid's: say so


def test_sgld_takes_its_level_from_make_finetune_noise_else_the_basis_grid(flow_run):
    def record(sigma):
        config = load_config("toy_flow", "default", [*flow_run, "separation.algorithm=sgld",
                                                     "separation.prior_levels=exact",
                                                     f"separation.sgld_prior_sigma={sigma}"])
        return config, build_separator(config)[3]

    config, used = record(0.03)  # finished in both layouts
    assert used["prior_dir_per_level"] == [str(prior_dir(config, 0.03))] == [used["selection_prior_dir"]]
    config, used = record(0.0949)  # the BASIS grid only
    assert used["prior_dir_per_level"] == [str(prior_dir(config, 0.0949, "basis"))]
    with pytest.raises(FileNotFoundError, match="make finetune-noise SIGMA=0.5"):
        record(0.5)


@pytest.mark.parametrize("overrides, kind, alpha, origin", [
    ([], "mean", [0.25] * 4, "data.name=toy"),
    (["data.name=musdb18"], "sum", [1.0] * 4, "data.name=musdb18"),
    (["data.name=slakh2100"], "sum", [1.0] * 4, "data.name=slakh2100"),
    (["data.name=musdb18", "separation.mixing=mean"], "mean", [0.25] * 4, "separation.mixing"),
    (["separation.mixing=sum"], "sum", [1.0] * 4, "separation.mixing"),
    (["separation.mixing_weights=[1,2,3,4]"], "weights", [1.0, 2.0, 3.0, 4.0], "separation.mixing_weights"),
])
def test_the_mixing_is_the_datasets_unless_overridden(flow_run, overrides, kind, alpha, origin):
    separator, _, _, record = build_separator(load_config("toy_flow", "default", flow_run + overrides))
    assert record["mixing"] == {"kind": kind, "alpha": alpha, "from": origin}
    assert separator.alpha.tolist() == alpha


def test_each_datasets_mix_is_made_as_its_mixing_says(tmp_path):
    from datamodules.synthetic_layouts import write_musdb_hq, write_slakh

    disk = {"cache_dir": str(tmp_path / "cache"), "eval_length": 2048, "crop_length": 1024, "n_test": 3,
            "batch_size": 2}
    configs = {
        "toy": {"name": "toy", "eval_length": 256, "crop_length": 256, "n_test": 3, "n_train": 4, "batch_size": 2},
        "musdb18": {"name": "musdb18", "root": str(write_musdb_hq(tmp_path / "musdb", n_train=2, n_test=1,
                                                                  seconds=1.0)),
                    "sources": ["drums", "bass", "other", "vocals"], **disk},
        "slakh2100": {"name": "slakh2100", "sample_rate": 22050,
                      "root": str(write_slakh(tmp_path / "slakh", {split: [["Drums", "Bass", "Guitar"]] for split in
                                                                   ("train", "validation", "test")}, seconds=1.0)),
                      "sources": ["drums", "bass", "guitar"], **disk},
    }
    for name, options in configs.items():
        data = load_config("toy_flow", "default", [f"data.{k}={v}" for k, v in options.items()]).data
        datamodule = build_datamodule(data)
        datamodule.setup("fit")
        datamodule.setup("test")
        combine = {"mean": torch.mean, "sum": torch.sum}[dataset_mixing(name)]
        for batch in (next(iter(datamodule.train_dataloader())), next(iter(datamodule.test_dataloader()))):
            assert torch.allclose(batch["mix"], combine(batch["sources"], dim=1), atol=1e-6), name
    assert (dataset_mixing("musdb18"), dataset_mixing("slakh2100"), dataset_mixing("toy")) == ("sum", "sum", "mean")


def test_separate_file_takes_the_datasets_mixing_and_records_it(flow_run, tmp_path):
    mix = tmp_path / "song.wav"
    write_mix(mix, rate=16000)
    config = load_config("toy_flow", "default", flow_run + ["separation.n_chains=1", "data.name=musdb18"])
    out_dir, info = separate_file(config, mix, tmp_path / "out")
    expected = {"kind": "sum", "alpha": [1.0] * 4, "from": "data.name=musdb18"}
    assert info["mixing"] == expected
    written = json.loads((out_dir / "separation.json").read_text())
    assert written["mixing"] == expected
    assert written["prior_dir_per_level"][0] == str(prior_dir(config, 0.3))


# Four noise levels 1.0 -> 0.01 (then a last step to 0), Heun: 7 score calls per mixture batch.
DIFFUSION = ["separation.algorithm=diffusion", "separation.diffusion_steps=4", "separation.diffusion_sigma_max=1.0",
             "separation.diffusion_sigma_min=0.01"]


@pytest.fixture(scope="module")
def diffusion_run(flow_run):
    return run_separation(load_config("toy_flow", "default", flow_run + DIFFUSION + ["separation.n_test=3"]))


def test_diffusion_runs_through_the_separation_loop_on_every_finished_level(flow_run, diffusion_run):
    results, out_dir = diffusion_run
    config = load_config("toy_flow", "default", flow_run + DIFFUSION)
    methods = ["average", "diffusion", "diffusion_selected_of_3", "diffusion_oracle_of_3", "diffusion_consensus_of_3"]
    assert list(results["summary"]) == methods
    rows = read_rows(out_dir)
    assert [(int(r["index"]), r["method"]) for r in rows] == [(i, m) for i in range(3) for m in methods]
    # The Dirac constraint: every estimate mixes back to its mixture (float rounding only), where the
    # chains start as N(0, 1) noise far from it.
    for row in rows:
        assert float(row["mix_error"]) < 1e-10, row
    for index in range(3):
        wav = out_dir / "wav" / f"{index:05d}"
        estimate = np.stack([read_wav(wav / f"diffusion_{s}.wav") for s in config.data.sources])
        np.testing.assert_allclose(estimate.mean(axis=0), read_wav(wav / "mix.wav"), atol=1e-4)
    summary = json.loads((out_dir / "summary.json").read_text())
    separator, selection, _, record = build_separator(config)
    trace = summary["trace"]
    assert trace["step_sigmas"] == separator.trace_sigmas and len(trace["mix_error"]) == separator.n_steps
    assert "level_sigmas" not in trace and all(np.isnan(trace["loglik"]))  # the sampler keeps no likelihood
    assert (out_dir / "trace.png").is_file()
    # Every finished level of either layout serves the schedule (BASIS grid first), the noiseless the selection.
    grids = {0.3: "paper003", 0.0949: "basis", 0.03: "basis", 0.0: "noiseless"}
    assert summary["config"]["prior_sigma_per_level"] == list(grids) == separator.score_model.sigmas
    assert summary["config"]["prior_grid_per_level"] == list(grids.values())
    assert summary["config"]["prior_dir_per_level"] == [str(prior_dir(config, s, g)) for s, g in grids.items()]
    assert summary["config"]["selection_prior_dir"] == str(prior_dir(config, 0.0))
    assert selection is separator.score_model.priors[-1] and summary["selection"] == "log_prob"
    # The diffusion sampler's options reach it; sigma_max 1.0 is capped at the top finished level, 0.3 (above it
    # that level's prior would serve every sigma).
    assert separator.sigmas == pytest.approx([0.3, 0.1147, 0.0377, 0.01, 0.0], abs=1e-4)
    assert separator.solver == "heun" and separator.constraint == "dirac"


def test_diffusion_asks_the_nearest_finished_level_for_each_sigma(flow_run):
    separator = build_separator(load_config("toy_flow", "default", flow_run + DIFFUSION))[0]
    levels = separator.score_model
    # The schedule's own sigmas, and the noiseless prior standing at 1e-4 on the log axis.
    asked = {1.0: 0.3, 0.2934: 0.3, 0.0663: 0.0949, 0.0949: 0.0949, 0.01: 0.03, 1e-3: 0.0, 0.0: 0.0}
    for sigma, served in asked.items():
        assert levels.prior_for(sigma) is levels.priors[levels.sigmas.index(served)], sigma


def test_separate_file_runs_the_diffusion_sampler(flow_run, tmp_path):
    mix = tmp_path / "song.wav"
    write_mix(mix, rate=16000)
    config = load_config("toy_flow", "default", flow_run + DIFFUSION + ["separation.n_chains=2"])
    out_dir, info = separate_file(config, mix, tmp_path / "out")
    assert info["n_chunks"] == 7 and info["selection"] == "log_prob" and info["mix_error"] < 1e-10
    assert len(info["selection_score_per_chunk"]) == 7


SCORE_MODEL = {"name": "score", "width": 8, "n_layers": 2, "embed_dim": 8}


@pytest.fixture(scope="module")
def score_run(tmp_path_factory):
    """A noise-conditional run: its noiseless checkpoint only (untrained weights: these tests check the
    wiring, not the quality), no fine-tuned level anywhere."""
    from lightning_modules.prior_module import PriorModule

    root = tmp_path_factory.mktemp("score") / "runs"
    # toy_flow's data and separation settings; its flow options unset, as the score family has none of them.
    overrides = ([o for o in TINY if not o.startswith("model.")] + SEPARATION + [f"output_root={root}"]
                 + [f"model.{k}=null" for k in ("n_blocks", "n_flows")]
                 + [f"model.{k}={v}" for k, v in SCORE_MODEL.items()])
    config = load_config("toy_flow", "default", overrides)
    torch.manual_seed(0)
    module = PriorModule(model=SCORE_MODEL, sources=list(config.data.sources))
    directory = prior_dir(config, 0.0)
    directory.mkdir(parents=True)
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, directory / "last.ckpt")
    mark_done(directory, {"noise_sigma": 0.0, "stand_in": True})
    return overrides


@pytest.mark.parametrize("algorithm", ["basis", "sgld", "diffusion"])
def test_a_noise_conditional_family_serves_every_level_from_its_noiseless_run(score_run, algorithm):
    options = [*DIFFUSION[1:], f"separation.algorithm={algorithm}", "separation.prior_levels=exact",
               "separation.sgld_steps=4"]
    config = load_config("toy_flow", "default", score_run + options)
    separator, selection, _, record = build_separator(config)
    assert record["prior_grid_per_level"] == ["noise-conditional"]
    assert record["prior_dir_per_level"] == [str(prior_dir(config, 0.0))] == [record["selection_prior_dir"]]
    assert separator.score_model is selection and selection.noise_conditional
    assert record["selection"] == "denoising score"
    mix = 0.1 * torch.randn(1, 256, generator=torch.Generator().manual_seed(0))
    samples, trace = separator(mix, 2, [0])
    assert samples.shape == (1, 2, 4, 256) and torch.isfinite(samples).all()
    assert trace["loglik"].isnan().all() and trace["mix_error"].shape == (1, separator.n_steps)


def test_the_selected_chain_is_the_score_familys_denoising_choice(score_run):
    # One mixture per batch: ScorePrior.selection_score draws its fixed noise for the whole batch, so a
    # chain's score depends on its place in the batch, and the rerun below has the 3 chains alone.
    options = ["separation.n_test=2", "separation.batch_size=1", "separation.museval=false"]
    config = load_config("toy_flow", "default", score_run + DIFFUSION + options)
    results, out_dir = run_separation(config)
    assert results["selection"] == "denoising score"
    rows = read_rows(out_dir)
    selection = build_separator(config)[1]
    for index in range(2):
        samples, _, _ = chains_of(config, out_dir, index)
        with torch.no_grad():
            scores = selection.prior.selection_score(samples).mean(dim=1)  # [C]
        chosen = {r["method"]: r for r in rows if int(r["index"]) == index}
        assert np.ptp(scores.numpy()) > 0  # the chains differ, so the choice means something
        assert int(chosen["diffusion_selected_of_3"]["chain"]) == int(scores.argmax())
        written = float(chosen["diffusion_selected_of_3"]["selection_score"])
        assert written == pytest.approx(float(scores.max()), rel=1e-4)


def test_relabelling_reaches_the_sampler_and_the_summary(score_run):
    options = ["separation.n_test=2", "separation.museval=false", "separation.diffusion_constraint=projected",
               "separation.diffusion_relabel_sigmas=[0.5,0.05]", "separation.name=relabel"]
    config = load_config("toy_flow", "default", score_run + DIFFUSION + options)
    separator = build_separator(config)[0]
    assert separator.relabel_sigmas == [0.5, 0.05] and separator.constraint == "projected"
    results, out_dir = run_separation(config)
    assert 0 <= results["relabelled_chains"] <= 2 * 3
    assert json.loads((out_dir / "summary.json").read_text())["relabelled_chains"] == results["relabelled_chains"]
    for row in read_rows(out_dir):
        assert float(row["mix_error"]) < 1e-10, row  # relabelled or not, every estimate mixes back


def test_the_table_reuses_a_finished_entry_from_before_an_option_existed(tmp_path):
    from experiments.config import to_dict
    from experiments.separation_table import finished_results

    config = load_config("toy_flow", "default", ["separation.n_test=32"])
    older = {k: v for k, v in to_dict(config.separation).items() if k not in ("init", "posterior")}
    (tmp_path / "summary.json").write_text(json.dumps({"config": {"separation": older}, "summary": {}}))
    assert finished_results(tmp_path, config) is not None
    assert finished_results(tmp_path, load_config("toy_flow", "default", ["separation.n_test=8"])) is None
    assert finished_results(tmp_path, load_config("toy_flow", "default", ["separation.n_test=32",
                                                                           "separation.init=variational"])) is None


def test_the_table_reuses_a_posteriors_entry_only_with_that_very_posterior(tmp_path):
    from datamodules.atomic_io import file_sha256
    from experiments.config import to_dict
    from experiments.separation_table import finished_results

    config = load_config("toy_flow", "default", ["separation.algorithm=variational"])
    posterior = tmp_path / "posterior"
    posterior.mkdir()
    (posterior / "last.ckpt").write_bytes(b"trained once")
    used = {"posterior_dir": str(posterior), "posterior_sha256": file_sha256(posterior / "last.ckpt")}
    summary = {"config": {"separation": to_dict(config.separation), "posterior": used}, "summary": {}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert finished_results(tmp_path, config) is not None
    (posterior / "last.ckpt").write_bytes(b"trained again")  # e.g. a new default recipe under the same name
    assert finished_results(tmp_path, config) is None
    del used["posterior_sha256"]  # a run from before the checkpoint was recorded
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert finished_results(tmp_path, config) is None
    summary["config"]["posterior"] = to_dict(config.posterior)  # a run without a posterior: the config's section
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert finished_results(tmp_path, config) is not None


def test_a_subset_entry_scores_fewer_mixtures_and_the_table_says_how_many():
    from experiments.separation_table import entry_overrides, markdown, table_rows

    special = {"output_root": "runs", "preset": "default"}
    n_test = {}
    for entry in ("basis-flow", "variational-flow"):
        experiment, overrides = entry_overrides(entry, None, special, [])
        n_test[entry] = load_config(experiment, "default", overrides).separation.n_test
    assert n_test == {"basis-flow": 8, "variational-flow": 32}
    stats = {"count": 8, "si_sdr": -1.0, "si_sdri": 2.0, "sdr": 3.0}
    outcome = {"results": {"algorithm": "basis", "n_chains": 4, "summary": {"average": {**stats, "si_sdri": 0.0},
                                                                            "basis": stats}}}
    whole = {"results": {"algorithm": "variational", "n_chains": 4, "summary": {
        "average": {**stats, "count": 32, "si_sdr": -5.0, "si_sdri": 0.0}, "variational_mean": {**stats, "count": 32}}}}
    rows = table_rows({"4 sources": {"basis-flow": outcome, "variational-flow": whole}})
    assert [(r["method"], r["variant"], r["count"]) for r in rows[:2]] == [("average", "-", 32),
                                                                          ("average", "the first 8", 8)]
    lines = markdown(rows, "default").splitlines()
    assert "| n |" in lines[-6] and "| 4 sources | basis-flow | one sample | 8 | -1.00 | 2.00 | 3.00 |" in lines[-2]


def test_the_derived_source_and_the_pair_refinement_reach_the_sampler_and_the_summary(score_run, caplog):
    options = ["separation.n_test=2", "separation.museval=false", "separation.diffusion_dirac_derived=square",
               "separation.diffusion_pair_sweeps=1", "separation.diffusion_pair_steps=3", "separation.name=pairs"]
    config = load_config("toy_flow", "default", score_run + DIFFUSION + options)
    separator = build_separator(config)[0]
    assert separator.dirac_derived == list(config.data.sources).index("square")
    assert separator.pair_sweeps == 1 and len(separator._pairs[1].sigmas) == 3 + 1
    results, out_dir = run_separation(config)
    assert json.loads((out_dir / "summary.json").read_text())["pair_moves_accepted"] == results["pair_moves_accepted"]
    assert 0 <= results["pair_moves_accepted"]
    for row in read_rows(out_dir):
        assert float(row["mix_error"]) < 1e-10, row  # the main run's constraint holds for every estimate
    subset = load_config("toy_flow", "default", score_run + DIFFUSION + options + ["separation.sources=[sine,saw]"])
    with caplog.at_level("WARNING"):
        assert build_separator(subset)[0].dirac_derived == "last"  # the preset's square is not separated here
    assert "not separated here" in caplog.text
    typo = load_config("toy_flow", "default", score_run + DIFFUSION + ["separation.diffusion_dirac_derived=sqare"])
    with pytest.raises(ConfigError, match="sqare"):
        build_separator(typo)


@pytest.mark.parametrize("overrides, expected", [
    ([], "variational_sine-square"),
    (["posterior.name=seed1"], "variational_sine-square_seed1"),
    (["separation.posterior=seed2", "separation.split=val"], "variational_sine-square_seed2_val"),
    (["separation.name=mine", "posterior.name=seed1"], "mine"),
    (["separation.algorithm=basis", "posterior.name=seed1"], "basis_sine-square"),
])
def test_two_posteriors_of_the_same_sources_separate_into_their_own_folders(overrides, expected):
    config = load_config("toy_score", "default", ["separation.algorithm=variational", *overrides])
    assert output_name(config, ["sine", "square"]) == expected
