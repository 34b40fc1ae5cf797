"""posterior.prior_sigmas: the variational posterior trained coarse to fine over prior levels (issue 28).

Unit level, with analytic Gaussian priors: the stage of each step (boundaries, a fresh module at a resumed
step), the sigma a score prior is asked for, the level a likelihood family is scored with, and the single
level (prior_sigmas=None) giving the loss it always gave. End to end, on the tiny flow prior and three
"fine-tuned levels" made from it (copies with distinct weights, which is all the schedule can tell apart):
an interrupted and resumed make train-posterior, its record and checkpoint, the finished posterior's use
of the finest level, and the errors."""
import json
import shutil

import pytest
import torch

from experiments.cli import main
from experiments.config import ConfigError, load_config
from experiments.run_layout import load_prior
from experiments.train import train_noiseless
from experiments.train_posterior import (build_module, check_source, load_posterior, posterior_dir, source_record,
                                         train_posterior)
from lightning_modules.nn.elbo import elbo_terms
from lightning_modules.nn.gaussian_prior import GaussianPrior
from lightning_modules.nn.prior_schedule import PriorSchedule, stage_index, stage_starts
from lightning_modules.posterior_module import PosteriorModule
from lightning_modules.prior_module import mix_seed
from tests.conftest import TINY, TINY_POSTERIOR, logged

pytestmark = pytest.mark.usefixtures("one_thread")

SIGMAS = [0.3, 0.1, 0.077]
MEANS, STDS = [0.1, -0.2], [0.3, 0.5]
NET = {"width": 4, "n_layers": 2, "init_scale": 0.2}
BATCH = {"mix": 0.3 * torch.randn(2, 64, generator=torch.Generator().manual_seed(0)), "index": torch.arange(2)}


class Recording(GaussianPrior):
    """A Gaussian prior that notes each call: ``calls`` of log_prob, ``sigmas`` asked of score."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.sigmas = 0, []

    def log_prob(self, x):
        self.calls += 1
        return super().log_prob(x)

    def score(self, x, sigma):
        self.sigmas.append(sigma)
        return super().score(x, sigma)


def module_at(monkeypatch, step):
    """Every PosteriorModule sees ``step`` as its global step (what a trainer, or a resumed one, sets)."""
    monkeypatch.setattr(PosteriorModule, "global_step", property(lambda self: step))


def posterior(prior, schedule=None, score_sigma=None, warmup_steps=0):
    torch.manual_seed(0)  # the same initial posterior in every module
    return PosteriorModule(net=NET, sources=["a", "b"], alpha=[0.5, 0.5], warmup_steps=warmup_steps,
                           schedule_steps=10, score_sigma=score_sigma, prior=prior, schedule=schedule)


def test_stages_split_the_steps_equally_and_the_last_one_holds_past_the_end():
    assert stage_starts(10, 3) == [0, 3, 7]  # round(10/3), round(20/3)
    assert [stage_index(s, 10, 3) for s in range(12)] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2]
    assert [stage_index(s, 6, 3) for s in range(6)] == [0, 0, 1, 1, 2, 2]
    assert {stage_index(s, 600, 1) for s in range(600)} == {0}
    with pytest.raises(ValueError, match="at least one step each"):
        stage_index(0, 2, 3)


@pytest.mark.parametrize("step, sigma", [(0, 0.3), (2, 0.3), (3, 0.1), (6, 0.1), (7, 0.077), (9, 0.077), (15, 0.077)])
def test_a_score_prior_is_asked_for_its_score_at_the_stage_sigma(monkeypatch, step, sigma):
    prior = Recording(MEANS, STDS)
    # A new module at ``step``, as after a restart: the stage comes from the global step alone.
    module = posterior(prior, PriorSchedule(SIGMAS, 10, score_prior=prior), score_sigma=SIGMAS[-1])
    module_at(monkeypatch, step)
    loss = module.training_step(BATCH, 0)
    assert prior.sigmas == [sigma]
    # The same loss as a single-level posterior against the score at that sigma.
    single = posterior(Recording(MEANS, STDS), score_sigma=sigma)
    assert torch.equal(loss, single.training_step(BATCH, 0))


@pytest.mark.parametrize("step, stage", [(0, 0), (2, 0), (3, 1), (6, 1), (7, 2), (9, 2)])
def test_a_likelihood_family_is_scored_by_the_level_of_the_stage(monkeypatch, step, stage):
    levels = [Recording(MEANS, STDS, noise_sigma=s) for s in SIGMAS]
    module = posterior(levels[-1], PriorSchedule(SIGMAS, 10, levels=levels))
    module_at(monkeypatch, step)
    loss = module.training_step(BATCH, 0)
    assert [level.calls for level in levels] == [int(k == stage) for k in range(3)]
    assert torch.equal(loss, posterior(levels[stage]).training_step(BATCH, 0))
    # Validation is the finished posterior's: the finest level, whatever the step.
    for level in levels:
        level.calls = 0
    module.validation_step({**BATCH, "sources": torch.zeros(2, 2, 64)}, 0)
    assert [level.calls for level in levels][:2] == [0, 0] and levels[-1].calls > 0


def test_without_a_schedule_the_loss_is_the_one_it_always_was(monkeypatch):
    """prior_sigmas=None: the ELBO of the one prior, computed as before schedules (bit for bit)."""
    prior = GaussianPrior(MEANS, STDS, noise_sigma=0.077)
    module = posterior(prior, warmup_steps=8)
    module_at(monkeypatch, 5)
    loss = module.training_step(BATCH, 0)
    # The previous training step, written out: its seed, its uniforms, elbo_terms at the module's prior.
    generator = torch.Generator().manual_seed(mix_seed(0, 0, 5, 0))
    q = module.posterior(BATCH["mix"])
    uniform = torch.rand(2, 2, 64, generator=generator)
    terms = elbo_terms(q, prior, BATCH["mix"].float(), module.alpha, module.hparams.gamma, uniform, None)
    kl = terms["prior_objective"].sum(dim=1) + terms["entropy"].sum(dim=1)
    assert torch.equal(loss, -(5 / 8 * kl + terms["mixture"]).mean())
    # A one-level schedule at the same prior is the same fit.
    one_level = posterior(prior, PriorSchedule([0.077], 10, levels=[prior]), warmup_steps=8)
    assert torch.equal(loss, one_level.training_step(BATCH, 0))


def test_no_level_is_saved_with_the_posterior():
    levels = [GaussianPrior(MEANS, STDS, noise_sigma=s) for s in SIGMAS]
    module = posterior(levels[-1], PriorSchedule(SIGMAS, 10, levels=levels))
    assert any(k.startswith("prior_schedule.") for k in module.state_dict())
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and all(k.startswith("net.") for k in checkpoint["state_dict"])
    assert not any(p.requires_grad for level in levels for p in level.parameters())


def test_trainer_compile_reaches_every_level(monkeypatch):
    from experiments.trainer_factory import compile_prior

    levels = [GaussianPrior(MEANS, STDS, noise_sigma=s) for s in SIGMAS]
    module = posterior(levels[-1], PriorSchedule(SIGMAS, 10, levels=[levels[0], levels[0], levels[2]]))
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda method: compiled.append(method) or method)
    compile_prior(module)
    assert [m.__self__ for m in compiled] == [levels[2], levels[0]]  # the finest first; each module once


@pytest.mark.parametrize("value, message", [
    ("[]", "at least one sigma"),
    ("[0.1,0.3,0.077]", "strictly descending"),
    ("[0.3,0.3]", "strictly descending"),
    ("[0.3,0]", "positive"),
    ("[0.3,-0.1]", "positive"),
    ("[0.3,abc]", "bad configuration: key 'posterior.prior_sigmas"),
])
def test_a_bad_schedule_is_refused_before_anything_starts(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config("toy_flow", "default", [f"posterior.prior_sigmas={value}"])


def test_a_schedule_longer_than_the_training_is_refused():
    with pytest.raises(ConfigError, match="each level needs at least one step"):
        load_config("toy_flow", "default", ["posterior.prior_sigmas=[0.3,0.1,0.077]", "posterior.max_steps=2"])


# End to end on tiny flow priors.

def fingerprint(module):
    return float(sum(p.detach().double().sum() for p in module.parameters()))


@pytest.fixture(scope="module")
def levels_run(tmp_path_factory):
    """The tiny noiseless flow prior and three 'fine-tuned levels': copies with distinct weights."""
    root = tmp_path_factory.mktemp("schedule") / "runs"
    common = TINY + [f"output_root={root}", "trainer.max_steps=4", "trainer.log_every_n_steps=1",
                     "trainer.checkpoint_every_n_steps=1"]
    train_noiseless(load_config("toy_flow", "default", common))
    run = root / "toy_flow" / "default"
    prints = {}
    for k, sigma in enumerate(SIGMAS):
        level = run / f"sigma_{sigma:g}"
        shutil.copytree(run / "noiseless", level)
        state = torch.load(level / "last.ckpt", map_location="cpu", weights_only=True)
        next(iter(state["state_dict"].values())).add_(0.01 * (k + 1))
        torch.save(state, level / "last.ckpt")
        prints[sigma] = fingerprint(load_prior(level).prior)
    return {"common": common, "run": run, "prints": prints,
            "args": [*common, *TINY_POSTERIOR, "posterior.max_steps=6", "posterior.val_check_interval=3"]}


def scheduled(levels_run, *extra):
    return load_config("toy_flow", "default", [*levels_run["args"], f"posterior.prior_sigmas={SIGMAS}", *extra])


def test_training_goes_coarse_to_fine_and_resumes_mid_stage(levels_run):
    config = scheduled(levels_run)
    served, original = [], PosteriorModule.training_level

    def spy(self):
        prior, score_sigma, sigma = original(self)
        served.append((self.global_step, sigma, fingerprint(prior.prior)))
        if self.global_step == 3 and len(served) == 4:
            raise RuntimeError("interrupted")  # last.ckpt is at step 3, the middle of the second stage
        return prior, score_sigma, sigma

    PosteriorModule.training_level = spy
    try:
        with pytest.raises(RuntimeError, match="interrupted"):
            train_posterior(config)
        run_dir = posterior_dir(config, list(config.data.sources))
        assert not (run_dir / "done.json").exists()
        train_posterior(config)  # resumes at step 3
    finally:
        PosteriorModule.training_level = original
    expected = [0.3, 0.3, 0.1, 0.1, 0.1, 0.077, 0.077]  # step 3 twice: interrupted, then resumed
    assert [s for _, s, _ in served] == expected and [s for s, _, _ in served] == [0, 1, 2, 3, 3, 4, 5]
    assert [p for _, _, p in served] == [levels_run["prints"][s] for s in expected]
    assert logged(run_dir, "train/prior_sigma") == pytest.approx([0.1, 0.077, 0.077])  # the resumed steps 3-5
    record = json.loads((run_dir / "posterior_source.json").read_text())
    assert record["prior_sigmas"] == SIGMAS and [level["sigma"] for level in record["levels"]] == SIGMAS
    assert [level["prior_dir"] for level in record["levels"]] == [str(levels_run["run"] / f"sigma_{s:g}") for s in SIGMAS]
    assert len({level["sha256"] for level in record["levels"]}) == 3
    assert record["prior_dir"].endswith("sigma_0.077") and record["sha256"] == record["levels"][-1]["sha256"]
    state = torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert state and all(key.startswith("net.") for key in state)  # no level's weights
    # The finished posterior is used with its finest level only.
    module, used = load_posterior(config, list(config.data.sources))
    assert module.prior_schedule is None and used["prior_dir"].endswith("sigma_0.077")
    assert fingerprint(module.prior.prior) == levels_run["prints"][0.077]
    assert torch.equal(module.net.encoder.end_out.conv.weight, state["net.encoder.end_out.conv.weight"])


def test_a_changed_level_is_refused(levels_run, tmp_path, capsys):
    config = scheduled(levels_run, "posterior.name=changed")
    record = source_record(config, list(config.data.sources))
    run_dir = posterior_dir(config, list(config.data.sources))
    run_dir.mkdir(parents=True)
    (run_dir / "posterior_source.json").write_text(json.dumps(record))
    check_source(run_dir, record)
    middle = dict(record["levels"][1], sha256="0" * 64)
    with pytest.raises(ValueError, match="prior at sigma 0.1 of the posterior .* changed since it was trained"):
        check_source(run_dir, {**record, "levels": [record["levels"][0], middle, record["levels"][2]]})
    with pytest.raises(ValueError, match=r"trained with posterior.prior_sigmas=\[0.3, 0.1, 0.077\], not None"):
        check_source(run_dir, source_record(load_config("toy_flow", "default", levels_run["args"]),
                                            list(config.data.sources)))
    assert main(["train-posterior", "experiment=toy_flow", *levels_run["args"], "posterior.name=changed",
                 "posterior.prior_sigmas=[0.3,0.1]"]) == 2
    assert "trained with posterior.prior_sigmas" in capsys.readouterr().err


def test_a_single_level_record_from_before_schedules_still_loads(levels_run, tmp_path):
    config = load_config("toy_flow", "default", [*levels_run["args"], "posterior.prior_sigma=0.1"])
    record = source_record(config, ["sine", "square"])
    assert set(record) == {"prior_dir", "prior_sigma", "score_sigma", "sha256", "sources"}  # the old format
    (tmp_path / "posterior_source.json").write_text(json.dumps(record))
    check_source(tmp_path, record)
    with pytest.raises(ValueError, match="trained with posterior.prior_sigmas=None"):
        check_source(tmp_path, source_record(scheduled(levels_run), ["sine", "square"]))


def test_a_missing_level_names_the_finetune_command_or_the_nearest_serves(levels_run, capsys):
    args = ["train-posterior", "experiment=toy_flow", *levels_run["args"], "posterior.prior_sigmas=[0.3,0.2,0.077]"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no finished prior at sigma 0.2 (a level of posterior.prior_sigmas" in err
    assert "make finetune-noise SIGMA=0.2" in err
    config = load_config("toy_flow", "default", [*args[2:], "posterior.prior_levels=nearest"])
    record = source_record(config, list(config.data.sources))
    assert [level["prior_sigma"] for level in record["levels"]] == [0.3, 0.3, 0.077]
    module = build_module(config, list(config.data.sources), record)
    schedule = module.prior_schedule
    assert len(schedule.priors()) == 2 and schedule.at(0)[0] is schedule.at(2)[0]  # 0.3 loaded once
    assert schedule.at(4)[0] is module.prior


def test_a_schedule_starts_from_the_posterior_a_single_level_run_starts_from(levels_run):
    single = load_config("toy_flow", "default", [*levels_run["args"], "posterior.prior_sigma=0.077"])
    modules = []
    for config in (single, scheduled(levels_run)):
        record = source_record(config, list(config.data.sources))
        torch.manual_seed(config.seed)
        modules.append(build_module(config, list(config.data.sources), record))
    assert all(torch.equal(a, b) for a, b in zip(modules[0].net.parameters(), modules[1].net.parameters()))


def test_a_score_prior_schedule_records_one_checkpoint_at_every_sigma(tmp_path):
    config = load_config("toy_score", "default", [f"output_root={tmp_path}", f"posterior.prior_sigmas={SIGMAS}"])
    noiseless = tmp_path / "toy_score" / "default" / "noiseless"
    noiseless.mkdir(parents=True)
    (noiseless / "done.json").write_text("{}")
    (noiseless / "last.ckpt").write_bytes(b"weights")
    record = source_record(config, list(config.data.sources))
    assert [(level["score_sigma"], level["prior_dir"]) for level in record["levels"]] == [(s, str(noiseless))
                                                                                       for s in SIGMAS]
    assert record["score_sigma"] == 0.077 and len({level["sha256"] for level in record["levels"]}) == 1
