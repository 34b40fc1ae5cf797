"""The LQ-VAE family end to end on a tiny run: both training stages, the stage-1 report, the latent prior
contract, the latent cross-likelihood (single process and 2-process DDP)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.config import load_config
from experiments.cross_likelihood import run_cross_likelihood
from experiments.run_layout import load_prior, prior_dir
from experiments.train import finetune, train_noiseless
from experiments.train_lqvae import lqvae_dir, train_latent_priors
from tests.conftest import TINY_LQVAE, logged

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lqvae_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lqvae") / "runs"
    config = load_config("toy_lqvae", "default", TINY_LQVAE + [f"output_root={root}"])
    train_noiseless(config)
    return config


def test_both_stages_train_and_improve_their_losses(lqvae_run):
    stage1, stage2 = lqvae_dir(lqvae_run), prior_dir(lqvae_run, 0.0)
    losses = logged(stage1, "val/loss")
    assert len(losses) >= 3 and losses[-1] < 0.8 * losses[0], losses
    logliks = logged(stage2, "val/loglik")
    assert len(logliks) >= 3 and logliks[-1] > logliks[0] + 0.01, logliks
    for run_dir in (stage1, stage2):
        done = json.loads((run_dir / "done.json").read_text())
        assert done["global_step"] == (40 if run_dir == stage1 else 60)
        assert (run_dir / "config.yaml").is_file()
    assert json.loads((stage2 / "lqvae_source.json").read_text())["checkpoint"].endswith("lqvae/last.ckpt")


def test_the_stage1_report_has_every_class(lqvae_run):
    report = json.loads((lqvae_dir(lqvae_run) / "report" / "lqvae_report.json").read_text())["results"]
    sources = list(lqvae_run.data.sources)
    assert report["sources"] == sources and report["count"] == 7
    assert set(report["si_sdr"]) == set(sources) and set(report["lin_error"]) == set(sources)
    # model.lin_sources defaults to every source: the report's groups are the four-source mixtures.
    assert report["lin_sources"] == 4 and report["lin_pairs"][0] == "sine+square+saw+triangle"
    assert 1.0 <= report["perplexity_all"] <= 16 and report["codes_used_all"] + report["dead_codes_all"] == 16
    for name in ("lqvae_report.csv", "lqvae_report.md", "config.yaml"):
        assert (lqvae_dir(lqvae_run) / "report" / name).is_file()


def test_latent_log_prob_is_the_code_likelihood_per_audio_sample(lqvae_run):
    prior = load_prior(prior_dir(lqvae_run, 0.0), list(lqvae_run.data.sources)).prior
    x = 0.5 * torch.randn(2, 4, 512)  # 32 codes: two windows of the 16-code context
    with torch.no_grad():
        codes = prior.codes(x)
        assert codes.shape == (2, 4, 32)
        by_hand = (prior.transformer.log_prob_codes(codes[..., :16]) + prior.transformer.log_prob_codes(codes[..., 16:])) / 512
        assert torch.allclose(prior.log_prob(x), by_hand)
        # Source k's codes are scored by prior k: swapping the channels changes the scores.
        assert not torch.allclose(prior.log_prob(x.flip(1)), prior.log_prob(x).flip(1))
    # The stage-2 checkpoint carries the frozen LQ-VAE: its codes equal stage 1's.
    stage1 = torch.load(lqvae_dir(lqvae_run) / "last.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(stage1["lqvae.quantizer.codebook"], prior.lqvae.quantizer.codebook)
    samples = prior.sample(3, 128, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, 4, 128) and torch.isfinite(samples).all()


def test_stage2_refuses_a_changed_lqvae_and_noise_finetuning(lqvae_run, tmp_path):
    copy = tmp_path / "runs"
    shutil.copytree(Path(lqvae_run.output_root), copy)
    config = load_config("toy_lqvae", "default", TINY_LQVAE + [f"output_root={copy}"])
    checkpoint_path = lqvae_dir(config) / "last.ckpt"
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    checkpoint["state_dict"]["lqvae.quantizer.codebook"] += 1.0
    torch.save(checkpoint, checkpoint_path)
    with pytest.raises(ValueError, match="changed since the latent priors"):
        train_latent_priors(config)
    with pytest.raises(ValueError, match="noise fine-tuning does not apply"):
        finetune(config, 0.077)


def test_latent_cross_likelihood_is_labelled_and_equal_under_ddp(lqvae_run):
    results, out_dir = run_cross_likelihood(lqvae_run)
    assert "latent codes" in results["likelihood_method"]
    assert "latent codes" in (out_dir / "summary.md").read_text()
    single = json.loads((out_dir / "cross_likelihood.json").read_text())
    args = ["cross-likelihood", "experiment=toy_lqvae", *TINY_LQVAE, f"output_root={lqvae_run.output_root}",
            "data.eval_batch_size=2", "trainer.devices=2", "trainer.strategy=ddp"]
    ddp = subprocess.run([sys.executable, "-m", "experiments.cli", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    parallel = json.loads((out_dir / "cross_likelihood.json").read_text())
    assert parallel["count"] == single["count"] == 7
    for a, b in zip(single["matrices"], parallel["matrices"]):
        assert torch.allclose(torch.tensor(a["loglik"], dtype=torch.float64),
                              torch.tensor(b["loglik"], dtype=torch.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_pooled_latent_prior_gives_the_ratio_score(lqvae_run):
    """The same code path as every family: one Transformer over every source's codes, on the frozen LQ-VAE."""
    run_dir = train_latent_priors(lqvae_run, pooled=True)
    assert run_dir == prior_dir(lqvae_run, 0.0, pooled=True)
    assert load_prior(run_dir).sources == ["pooled"]
    results, out_dir = run_cross_likelihood(lqvae_run)
    report = json.loads((out_dir / "discrimination.json").read_text())
    assert set(report["levels"][0]["ratio"]["auroc"]) == set(lqvae_run.data.sources)


def test_compare_includes_the_latent_priors_with_their_label(lqvae_run, tmp_path):
    from experiments.compare import run_compare

    results, out_dir = run_cross_likelihood(lqvae_run)
    latent = json.loads((out_dir / "cross_likelihood.json").read_text())
    root = tmp_path / "runs"
    # Stand-ins for the flow and WaveNet results the comparison always needs (the lqvae matrix relabelled).
    for experiment, name in (("toy_flow", "flowavenet"), ("toy_wavenet", "wavenet"), ("toy_lqvae", "lqvae")):
        entry = {**latent, "config": {**latent["config"], "model": {**latent["config"]["model"], "name": name}}}
        if name != "lqvae":
            entry.pop("likelihood_method")
        target = root / experiment / "default" / "cross_likelihood" / "cross_likelihood.json"
        target.parent.mkdir(parents=True)
        target.write_text(json.dumps(entry))
    compare_dir, _ = run_compare(load_config("toy_flow", "default", [f"output_root={root}"]))
    text = (compare_dir / "comparison.md").read_text()
    assert "LQ-VAE + Transformer prior, latent codes" in text and "FloWaveNet, full density" in text


def test_the_ablation_trains_the_same_lqvae_without_the_linearisation_loss(lqvae_run):
    from experiments.lqvae_ablation import run_ablation

    table = run_ablation(lqvae_run).read_text()
    assert "without" in table and "linearisation error" in table
    ablation = json.loads((lqvae_dir(lqvae_run).parent / "lin_ablation.json").read_text())
    assert ablation["with_lin"]["lin_weight"] == 1.0 and ablation["without_lin"]["lin_weight"] == 0.0
    no_lin = lqvae_dir(lqvae_run).parent.parent / "default_no_lin" / "lqvae" / "done.json"
    assert no_lin.is_file()


@pytest.mark.parametrize("algorithm", ["basis", "diffusion"])
def test_gradient_samplers_refuse_the_latent_priors_with_a_message(lqvae_run, algorithm):
    from experiments.config import ConfigError
    from experiments.separate import build_separator

    config = load_config("toy_lqvae", "default", TINY_LQVAE + [f"output_root={lqvae_run.output_root}",
                                                               f"separation.algorithm={algorithm}"])
    with pytest.raises(ConfigError, match="separation.algorithm=latent"):
        build_separator(config)


def test_slakh_lqvae_trains_both_stages_with_sum_mixing(tmp_path):
    from datamodules.synthetic_layouts import write_slakh
    from experiments.cli import main

    full = ["Drums", "Bass", "Guitar", "Piano"]
    root = write_slakh(tmp_path / "data", {"train": [full, full], "validation": [full], "test": [full]}, seconds=1.0)
    args = ["experiment=slakh_lqvae", f"output_root={tmp_path / 'runs'}", f"data.root={root}", *TINY_LQVAE,
            "trainer.max_steps=4", "trainer.val_check_interval=2", "lqvae.max_steps=4", "lqvae.val_check_interval=2",
            "data.frames_per_song=16"]
    assert main(["train", *args]) == 0
    run = tmp_path / "runs" / "slakh_lqvae" / "default"
    assert json.loads((run / "noiseless" / "done.json").read_text())["global_step"] == 4
    report = json.loads((run / "lqvae" / "report" / "lqvae_report.json").read_text())["results"]
    assert report["lin_mixing"] == "sum" and report["sources"] == ["drums", "bass", "guitar", "piano"]


LATENT = ["separation.algorithm=latent", "separation.sources=[sine,square]", "separation.n_test=5",
          "separation.n_chains=3", "separation.batch_size=2", "separation.museval=false", "separation.length=256"]


def test_latent_separation_runs_in_the_test_loop_and_equals_single_process_under_ddp(lqvae_run):
    import csv as csv_module

    common = ["separate", "experiment=toy_lqvae", *TINY_LQVAE, f"output_root={lqvae_run.output_root}", *LATENT,
              "separation.name=latent_ddp"]
    out_dir = Path(lqvae_run.output_root) / "toy_lqvae" / "default" / "separation" / "latent_ddp"

    def rows():
        with open(out_dir / "separation.csv") as stream:
            return list(csv_module.DictReader(stream))

    single = subprocess.run([sys.executable, "-m", "experiments.cli", *common], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    single_rows = rows()
    methods = {r["method"] for r in single_rows}
    assert methods == {"average", "latent", "latent_selected_of_3", "latent_oracle_of_3", "latent_consistent_of_3",
                       "latent_consensus_of_3"}
    summary = json.loads((out_dir / "summary.json").read_text())
    assert "rejection" in summary["selection"]
    ddp = subprocess.run([sys.executable, "-m", "experiments.cli", *common, "trainer.devices=2",
                          "trainer.strategy=ddp"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    ddp_rows = rows()
    assert len(ddp_rows) == len(single_rows) == 30
    for a, b in zip(single_rows, ddp_rows):
        assert (a["index"], a["method"], a["chain"]) == (b["index"], b["method"], b["chain"])
        assert float(a["si_sdr"]) == pytest.approx(float(b["si_sdr"]), abs=1e-3)


def test_latent_separation_needs_the_lqvae_family(tmp_path):
    from experiments.config import ConfigError
    from experiments.separate import build_separator
    from tests.conftest import TINY

    config = load_config("toy_flow", "default", TINY + [f"output_root={tmp_path}", "separation.algorithm=latent"])
    with pytest.raises(ConfigError, match="needs the LQ-VAE family"):
        build_separator(config)


def test_a_users_file_is_separated_with_the_latent_posterior(lqvae_run, tmp_path):
    import soundfile

    from experiments.separate_file import separate_file

    rate = lqvae_run.data.sample_rate
    t = torch.arange(600) / rate
    soundfile.write(tmp_path / "mix.wav", (0.3 * torch.sin(2 * torch.pi * 440 * t)).numpy(), rate)
    config = load_config("toy_lqvae", "default", TINY_LQVAE + [f"output_root={lqvae_run.output_root}", *LATENT,
                                                              "separation.min_seconds=0.01"])
    out_dir, info = separate_file(config, tmp_path / "mix.wav", tmp_path / "out")
    assert info["n_chunks"] == 3 and len(info["chosen_chain_per_chunk"]) == 3  # 600 samples in chunks of 256
    for name in ("sine.wav", "square.wav", "mix.wav", "separation.json"):
        assert (out_dir / name).is_file()
    assert soundfile.read(out_dir / "sine.wav")[0].shape == (600,)


def test_latent_sigma_auto_is_chosen_on_validation_crops_and_recorded(lqvae_run):
    from experiments.separate import build_separator
    from lightning_modules.samplers.latent_sigma import SIGMA_GRID

    overrides = TINY_LQVAE + [f"output_root={lqvae_run.output_root}", *LATENT]
    config = load_config("toy_lqvae", "default", overrides + ["separation.latent_sigma=auto"])
    separator, _, _, record = build_separator(config)
    table = {float(s): v for s, v in record["latent"]["sigma_auto"].items()}
    assert set(table) == set(SIGMA_GRID)
    assert record["latent"]["sigma"] == separator.sigma == max(table, key=table.get)
    assert len(set(table.values())) > 1  # the mixture term moves the true pair's probability
    fixed, _, _, record = build_separator(load_config("toy_lqvae", "default", overrides + ["separation.latent_sigma=0.3"]))
    assert fixed.sigma == 0.3 and "sigma_auto" not in record["latent"]
    bad = load_config("toy_lqvae", "default", overrides + ["separation.latent_sigma=best"])
    with pytest.raises(ValueError, match="positive number or 'auto'"):
        build_separator(bad)


def test_latent_window_may_be_given_per_list_of_sources(lqvae_run):
    from experiments.config import ConfigError
    from experiments.separate import build_separator

    overrides = TINY_LQVAE + [f"output_root={lqvae_run.output_root}", *LATENT, "separation.latent_sigma=0.3"]

    def window(value):
        separator, _, _, record = build_separator(load_config("toy_lqvae", "default", overrides + [
            f"separation.latent_window={value}"]))
        assert record["latent"]["window"] in (separator.window, None)
        return separator.window

    context = lqvae_run.model.context
    assert window(2) == 2 and window("null") == context
    assert window('{"sine,square": 2}') == 2
    assert window('{"square,sine": 2}') == 2 and window('{"sine,square,triangle": 2}') == context
    with pytest.raises(ConfigError, match="key 'sine,drums' must list two or more of the run's sources"):
        window('{"sine,drums": 2}')
    with pytest.raises(ValueError, match="latent_window must be in"):
        window('{"sine,square": 2.5}')
