import math

import pytest
import torch

from datamodules.sharded_sampler import ShardedEvalSampler
from datamodules.toy import EVAL_BAND, ToyDataModule, ToyDataset, example_seed
from datamodules.toy_waveforms import TOY_SOURCES, key_to_frequency, toy_example, waveform


def test_piano_range():
    assert key_to_frequency(1) == pytest.approx(27.5)
    assert key_to_frequency(88) == pytest.approx(4186.0, abs=0.1)


def test_amplitude_range_and_shapes():
    data = ToyDataset("train", 50, TOY_SOURCES, 2048, 16000)
    for i in range(50):
        item = data[i]
        peaks = item["sources"].abs().amax(dim=1)
        assert item["sources"].shape == (4, 2048)
        assert (peaks <= 1.0 + 1e-6).all()
        assert (peaks[1] >= 0.8 - 1e-6)  # square always reaches its amplitude
        assert torch.allclose(item["mix"], item["sources"].mean(dim=0))


def test_frequency_is_in_piano_range():
    sample_rate, length = 16000, 16000
    data = ToyDataset("test", 20, ["sine"], length, sample_rate)
    for i in range(20):
        spectrum = torch.fft.rfft(data[i]["sources"][0].double()).abs()
        peak_hz = spectrum.argmax().item() * sample_rate / length
        assert 26.5 <= peak_hz <= 4187.0


def test_waveform_shapes_are_right():
    t = dict(frequency=1.0, amplitude=1.0, phase=0.0, length=8, sample_rate=8)
    assert waveform("square", **t).tolist() == [1, 1, 1, 1, -1, -1, -1, -1]
    assert waveform("saw", **t).tolist() == pytest.approx([-1 + 2 * k / 8 for k in range(8)])
    assert waveform("triangle", **t).tolist() == pytest.approx([-1, -0.5, 0, 0.5, 1, 0.5, 0, -0.5])
    assert waveform("sine", **t).tolist() == pytest.approx([math.sin(2 * math.pi * k / 8) for k in range(8)], abs=1e-6)


def test_deterministic_and_splits_differ():
    a = ToyDataset("test", 10, TOY_SOURCES, 512, 16000)
    b = ToyDataset("test", 10, TOY_SOURCES, 512, 16000)
    assert torch.equal(a[7]["sources"], b[7]["sources"])
    train = ToyDataset("train", 10, TOY_SOURCES, 512, 16000)
    assert not torch.equal(a[7]["sources"], train[7]["sources"])
    # A subset of sources keeps each source's waveform unchanged.
    subset = ToyDataset("test", 10, ["saw", "sine"], 512, 16000)
    assert torch.equal(subset[3]["sources"][0], a[3]["sources"][2])


def test_run_seed_changes_training_data_only():
    def items(seed, split):
        dm = ToyDataModule(eval_length=256, crop_length=256, n_train=4, n_val=4, n_test=4, seed=seed)
        dataset = dm.dataset(split)
        return torch.stack([dataset[i]["sources"] for i in range(4)])

    for split in ("val", "test"):
        assert torch.equal(items(0, split), items(3, split))
    assert not torch.equal(items(0, "train")[0], items(3, "train")[0])


def test_training_data_never_repeats_a_val_or_test_example():
    # With a stride of 1_000_003 per run seed, seed 10's training example 0 used to be val example 30.
    for run_seed, split, index in ((10, "val", 30), (20, "test", 60)):
        train = ToyDataset("train", 1, TOY_SOURCES, 64, 16000, seed=run_seed)
        held_out = ToyDataset(split, 100, TOY_SOURCES, 64, 16000)
        assert not torch.equal(train[0]["sources"], held_out[index]["sources"])


@pytest.mark.parametrize("run_seed", [0, 9, 10, 20, 4294, -1])
def test_training_seeds_never_enter_the_eval_band(run_seed):
    low, high = EVAL_BAND
    seeds = [example_seed("train", i, run_seed) for i in (0, 1, 4999, 999_999)]
    assert all(0 <= s < 2**32 and not low <= s < high for s in seeds)
    assert example_seed("train", 7, 1) == 1_000_003 + 7  # seeds 0-9 keep their training data


def test_other_sample_rate():
    x = toy_example(0, ["sine"], 14700, 14700)
    assert x.shape == (1, 14700)


def test_unknown_source_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown toy source.*'flute'.*choose from"):
        ToyDataModule(sources=["sine", "flute"])


def test_datamodule_batches():
    dm = ToyDataModule(crop_length=256, eval_length=512, batch_size=3, eval_batch_size=4, n_train=9, n_val=5, n_test=6)
    batch = next(iter(dm.train_dataloader()))
    assert batch["sources"].shape == (3, 4, 256) and batch["mix"].shape == (3, 256)
    test_batches = list(dm.test_dataloader())
    assert sum(len(b["index"]) for b in test_batches) == 6
    assert test_batches[0]["sources"].shape[-1] == 512


@pytest.mark.parametrize("size,world", [(7, 2), (5, 3), (2, 4), (0, 2)])
def test_sharded_sampler_covers_each_example_exactly_once(size, world):
    seen = [i for rank in range(world) for i in ShardedEvalSampler(size, rank=rank, world_size=world)]
    assert sorted(seen) == list(range(size))
