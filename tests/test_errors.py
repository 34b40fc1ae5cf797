"""Bad input stops with a message that names the problem, exit code 2, and writes nothing."""
import pytest

from experiments.cli import main
from experiments.config import ConfigError, load_config
from experiments.run_layout import parse_sigma
from tests.conftest import TINY


def run_cli(capsys, *args):
    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-0.1", "abc", "nan", "inf", ""])
def test_bad_sigma(value, capsys, tmp_path):
    code, err = run_cli(capsys, "finetune", f"sigma={value}", f"output_root={tmp_path}")
    assert code == 2
    assert "SIGMA" in err or "noise level" in err
    assert not any(tmp_path.iterdir())


def test_parse_sigma_accepts_numbers():
    assert parse_sigma("0.077") == 0.077
    assert parse_sigma(0.07742636826811269) == 0.0774


def test_finetune_without_noiseless_checkpoint(capsys, tmp_path):
    code, err = run_cli(capsys, "finetune", "sigma=0.077", f"output_root={tmp_path}", *TINY)
    assert code == 2
    assert "no finished prior to fine-tune from" in err and "make train EXPERIMENT=toy_flow" in err
    assert not (tmp_path / "toy_flow" / "default" / "sigma_0.077").exists()


def test_cross_likelihood_without_priors(capsys, tmp_path):
    code, err = run_cli(capsys, "cross-likelihood", f"output_root={tmp_path}", *TINY)
    assert code == 2 and "no finished noiseless prior" in err


def test_unknown_source(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "data.sources=[sine,flute]", f"output_root={tmp_path}", *TINY)
    assert code == 2 and "flute" in err and "choose from" in err


def test_misspelled_config_key():
    with pytest.raises(ConfigError, match="batch_sise"):
        load_config("toy_flow", "default", ["data.batch_sise=4"])


def test_wrong_type_config_value():
    with pytest.raises(ConfigError, match="max_steps"):
        load_config("toy_flow", "default", ["trainer.max_steps=many"])


def test_unknown_preset_and_experiment(capsys):
    code, err = run_cli(capsys, "train", "preset=papr")
    assert code == 2 and "unknown preset 'papr'" in err and "paper" in err
    code, err = run_cli(capsys, "train", "experiment=nope")
    assert code == 2 and "unknown experiment" in err


def test_unknown_command(capsys):
    code, err = run_cli(capsys, "trian")
    assert code == 2 and "command" in err


def test_mismatched_checkpoint(tmp_path, capsys):
    from experiments.run_layout import prior_dir
    from experiments.train import train_noiseless

    overrides = TINY + [f"output_root={tmp_path}", "trainer.max_steps=2", "trainer.val_check_interval=2"]
    train_noiseless(load_config("toy_flow", "default", overrides))
    checkpoint = prior_dir(load_config("toy_flow", "default", overrides), 0.0) / "last.ckpt"
    before = checkpoint.read_bytes()
    code, err = run_cli(capsys, "finetune", "sigma=0.1", *overrides, "model.width=16")
    assert code == 2 and "does not match" in err and "width" in err
    assert checkpoint.read_bytes() == before


def test_unset_model_options_compare_equal_to_their_defaults():
    from experiments.run_layout import check_compatible

    stored = {"name": "flowavenet", "n_blocks": 2, "kernel_size": 3}
    check_compatible("x.ckpt", {"sources": ["sine"], "model": stored}, ["sine"],
                     {"name": "flowavenet", "n_blocks": 2, "kernel_size": None})
    with pytest.raises(ValueError, match="n_blocks"):
        check_compatible("x.ckpt", {"sources": ["sine"], "model": stored}, ["sine"],
                         {"name": "flowavenet", "n_blocks": 3})


def test_latent_only_is_refused_for_a_wavenet(tmp_path, capsys):
    from experiments.train import train_noiseless
    from tests.conftest import TINY_WAVENET

    overrides = TINY_WAVENET + [f"output_root={tmp_path}", "trainer.max_steps=2", "trainer.val_check_interval=2"]
    train_noiseless(load_config("toy_wavenet", "default", overrides))
    code, err = run_cli(capsys, "cross-likelihood", "experiment=toy_wavenet", *overrides,
                        "cross_likelihood.latent_only=true")
    assert code == 2 and "latent_only exists for flow priors (model.name=flowavenet) only" in err
    assert not (tmp_path / "toy_wavenet" / "default" / "cross_likelihood").exists()
