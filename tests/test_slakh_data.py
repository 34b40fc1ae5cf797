"""The Slakh2100 datamodule on a tiny generated dataset in its layout: class selection by inst_class
(stems of one class summed), 22.05 kHz, the split folders, paper 002's silent-chunk rule, and the
errors and warnings for a bad root or a bad track."""
import warnings

import numpy as np
import pytest
import soundfile
import torch
import torchaudio

from datamodules.slakh2100 import SlakhDataModule
from datamodules.stem_datamodule import DatasetLayoutError, SkippedTrackWarning
from datamodules.synthetic_layouts import write_slakh

FULL = ["Drums", "Bass", "Guitar", "Piano"]


def datamodule(root, cache, **options):
    defaults = dict(sources=["drums", "bass", "guitar", "piano"], sample_rate=22050, crop_length=1024,
                    eval_length=2048, batch_size=2, eval_batch_size=2, frames_per_song=5, cache_dir=str(cache))
    return SlakhDataModule(root=str(root), **{**defaults, **options})


def mono_at(path, rate):
    audio, native = soundfile.read(path, dtype="float32", always_2d=True)
    return torchaudio.functional.resample(torch.from_numpy(audio.mean(axis=1)), native, rate).numpy()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_slakh(tmp_path_factory.mktemp("slakh"), {
        # Track00001 has two guitar stems; Track00002 has no piano, so it cannot serve all four classes.
        "train": [FULL + ["Guitar", "Strings"], ["Drums", "Bass", "Guitar"], FULL],
        "validation": [FULL],
        "test": [["Piano", "Guitar", "Bass", "Drums"]],
    }, seconds=2.0)


def test_classes_are_selected_summed_and_resampled(root, tmp_path):
    dm = datamodule(root, tmp_path / "cache")
    songs, names = dm.load_songs("train")
    assert names == ["Track00001", "Track00003"]  # Track00002 lacks piano
    song = np.asarray(songs.array(0))
    assert song.shape == (4, 2 * 22050) and song.dtype == np.float32
    stems = root / "train" / "Track00001" / "stems"
    np.testing.assert_allclose(song[1], mono_at(stems / "S01.flac", 22050), atol=1e-5)  # bass
    guitar = mono_at(stems / "S02.flac", 22050) + mono_at(stems / "S04.flac", 22050)
    np.testing.assert_allclose(song[2], guitar, atol=1e-5)  # both guitar stems, summed
    # Rows follow the requested order, whatever the stem numbering (test track lists piano first).
    test_song = np.asarray(dm.load_songs("test")[0].array(0))
    np.testing.assert_allclose(test_song[3], mono_at(root / "test" / "Track00001" / "stems" / "S00.flac", 22050),
                               atol=1e-5)
    # Two classes only: Track00002 qualifies now.
    _, names = datamodule(root, tmp_path / "cache", sources=["Bass", "drums"]).load_songs("train")
    assert names == ["Track00001", "Track00002", "Track00003"]


def test_wav_stems_are_read_like_flac_ones(root, tmp_path):
    layout = {"train": [FULL + ["Guitar"], ["Drums", "Bass", "Guitar"]], "validation": [FULL], "test": [FULL]}
    flac = write_slakh(tmp_path / "flac", layout, seconds=1.0)
    wav = write_slakh(tmp_path / "wav", layout, seconds=1.0, extension="wav")
    assert not list(wav.rglob("*.flac"))
    flac_songs, flac_names = datamodule(flac, tmp_path / "cache_flac").load_songs("train")
    wav_songs, wav_names = datamodule(wav, tmp_path / "cache_wav").load_songs("train")
    assert wav_names == flac_names == ["Track00001"]  # the same metadata rules: Track00002 lacks piano
    np.testing.assert_allclose(np.asarray(wav_songs.array(0)), np.asarray(flac_songs.array(0)), atol=1e-4)
    # A stem present in two formats is read from its .flac; a stem in no readable format is missing.
    stems = wav / "train" / "Track00001" / "stems"
    soundfile.write(stems / "S00.flac", np.zeros(22050, dtype=np.float32), 22050)
    song = np.asarray(datamodule(wav, tmp_path / "cache_both").load_songs("train")[0].array(0))
    assert np.abs(song[0]).max() == 0 and np.abs(song[1]).max() > 0
    for path in stems.glob("S01.*"):
        path.rename(path.with_suffix(".txt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedTrackWarning)
        with pytest.raises(DatasetLayoutError, match="(?s)missing.*S01.flac"):
            datamodule(wav, tmp_path / "cache_missing").load_songs("train")


def test_splits_come_from_the_folders_and_batches_have_the_right_shape(root, tmp_path):
    dm = datamodule(root, tmp_path / "cache")
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.dataset("train")) == 2 * 5
    assert len(dm.dataset("val")) == len(dm.dataset("test")) == 2 * 22050 // 2048
    batch = next(iter(dm.train_dataloader()))
    assert batch["sources"].shape == (2, 4, 1024) and batch["mix"].shape == (2, 1024)


def test_silent_chunk_rule(tmp_path):
    root = write_slakh(tmp_path / "data", {"train": [FULL], "validation": [FULL], "test": [FULL]}, seconds=2.0)
    bass = root / "test" / "Track00001" / "stems" / "S01.flac"
    audio, rate = soundfile.read(bass)
    audio[rate // 2:] = 0.0  # bass silent after 0.5 s
    soundfile.write(bass, audio, rate)
    dm = datamodule(root, tmp_path / "cache", eval_length=1024)
    starts = [start for _, start in dm.dataset("test").frames]
    assert starts and max(starts) + 1024 <= 22050 // 2 + 1024
    for index in range(len(dm.dataset("test"))):
        sources = dm.dataset("test")[index]["sources"]
        assert (sources.norm(dim=1) / 1024 >= 1.5e-5).all()
    assert len(datamodule(root, tmp_path / "cache", eval_length=1024, silence_threshold=0).dataset("test")) == 43


def test_errors_name_the_path_and_layout(root, tmp_path, monkeypatch):
    monkeypatch.delenv("SLAKH_ROOT", raising=False)
    with pytest.raises(DatasetLayoutError, match="(?s)SLAKH_ROOT.*metadata.yaml"):
        SlakhDataModule(root=None, sources=["bass"], sample_rate=22050, crop_length=256, eval_length=256,
                        batch_size=1, eval_batch_size=1)
    (tmp_path / "bare").mkdir()
    with pytest.raises(DatasetLayoutError, match=f"(?s){tmp_path / 'bare'} has no train/ folder.*Sxx|S00.flac"):
        datamodule(tmp_path / "bare", tmp_path / "cache").setup("fit")
    with pytest.raises(DatasetLayoutError, match=r"no track in .*test has every requested class \['flute'\] "
                                                 r"\(classes found: \['bass', 'drums', 'guitar', 'piano'\]\)"):
        datamodule(root, tmp_path / "cache", sources=["flute"]).setup("test")


def test_a_bad_track_is_skipped_with_a_warning(tmp_path):
    root = write_slakh(tmp_path / "data", {"train": [FULL, FULL, FULL], "validation": [FULL], "test": [FULL]},
                       seconds=1.0)
    (root / "train" / "Track00001" / "metadata.yaml").write_text("stems: [unclosed")
    (root / "train" / "Track00002" / "stems" / "S03.flac").write_bytes(b"garbage")
    with pytest.warns(SkippedTrackWarning) as caught:
        _, names = datamodule(root, tmp_path / "cache").load_songs("train")
    assert names == ["Track00003"]
    messages = " ".join(str(w.message) for w in caught)
    assert "Track00001" in messages and "metadata.yaml" in messages and "Track00002" in messages
    (root / "train" / "Track00003" / "stems" / "S00.flac").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedTrackWarning)
        with pytest.raises(DatasetLayoutError, match="(?s)no usable slakh2100 track in split 'train'.*S00.flac"):
            datamodule(root, tmp_path / "cache").load_songs("train")


def test_slakh_experiment_trains(tmp_path):
    import json

    from experiments.cli import main
    from tests.conftest import TINY

    root = write_slakh(tmp_path / "data", {"train": [FULL, FULL], "validation": [FULL], "test": [FULL]}, seconds=1.0)
    args = ["experiment=slakh_flow", f"output_root={tmp_path / 'runs'}", f"data.root={root}", *TINY,
            "trainer.max_steps=4", "trainer.val_check_interval=2", "data.frames_per_song=16"]
    assert main(["train", *args]) == 0
    run = tmp_path / "runs" / "slakh_flow" / "default" / "noiseless"
    assert json.loads((run / "done.json").read_text())["global_step"] == 4
    assert "sample_rate: 22050" in (run / "config.yaml").read_text()
