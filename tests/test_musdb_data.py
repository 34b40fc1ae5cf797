"""The musdb18 datamodule on tiny generated datasets in the MUSDB18-HQ (.wav folders) and STEMS (.mp4)
layouts: shapes, rates, splits, source selection, silent-frame filtering, cache reuse and
invalidation, one decode per track across processes, and the errors for a bad root."""
import multiprocessing
import os
import time
import warnings

import numpy as np
import pytest
import soundfile
import torch
import torchaudio

import datamodules.musdb18 as musdb18
from datamodules.musdb18 import MusdbDataModule
from datamodules.stem_datamodule import DatasetLayoutError, SkippedTrackWarning
from datamodules.synthetic_layouts import VALIDATION_NAME, write_musdb_hq, write_musdb_stems

SECONDS = 3.0


def datamodule(root, cache, **options):
    defaults = dict(sources=["drums", "bass", "other", "vocals"], sample_rate=16000, crop_length=1024,
                    eval_length=4096, batch_size=4, eval_batch_size=4, frames_per_song=10, cache_dir=str(cache))
    return MusdbDataModule(root=root and str(root), **{**defaults, **options})


@pytest.fixture(scope="module")
def hq_root(tmp_path_factory):
    return write_musdb_hq(tmp_path_factory.mktemp("hq"), n_train=3, n_test=2, seconds=SECONDS)


@pytest.fixture(scope="module")
def stems_root(tmp_path_factory):
    return write_musdb_stems(tmp_path_factory.mktemp("stems"), n_train=3, n_test=2, seconds=SECONDS)


def cached_songs(dm, split):
    songs, names = dm.load_songs(split)
    return {name: np.asarray(songs.array(i)) for i, name in enumerate(names)}


def test_hq_shapes_rate_splits_and_content(hq_root, tmp_path):
    dm = datamodule(hq_root, tmp_path / "cache")
    train, val, test = (cached_songs(dm, split) for split in ("train", "val", "test"))
    assert list(val) == [VALIDATION_NAME] and VALIDATION_NAME not in train
    assert len(train) == 2 and len(test) == 2
    song = test[sorted(test)[0]]
    assert song.dtype == np.float32 and song.shape == (4, int(SECONDS * 16000))
    # Row k is stem k, downmixed to mono and resampled 44.1 -> 16 kHz with torchaudio.
    audio, rate = soundfile.read(hq_root / "test" / sorted(test)[0] / "bass.wav", dtype="float32")
    expected = torchaudio.functional.resample(torch.from_numpy(audio.mean(axis=1)), rate, 16000)
    np.testing.assert_allclose(song[1], expected.numpy(), atol=1e-4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["sources"].shape == (4, 4, 1024) and batch["mix"].shape == (4, 1024)
    assert torch.allclose(batch["mix"], batch["sources"].sum(dim=1))  # a song is the sum of its stems
    assert len(dm.dataset("train")) == 2 * 10
    dm.setup("test")
    assert dm.dataset("test")[0]["sources"].shape == (4, 4096)


def test_own_songs_hold_out_the_last_tenth_for_validation(hq_root, tmp_path, caplog):
    # None of these is on musdb's validation list; sorted by name, "Zed - Last" is the last tenth (one song).
    names = ["Zed - Last", "Alpha - One", "Mid - Two", "Beta - Three"]
    root = write_musdb_hq(tmp_path / "own", n_test=1, seconds=0.5, train_names=names)
    dm = datamodule(root, tmp_path / "cache", eval_length=1024)
    with caplog.at_level("WARNING", logger="datamodules.musdb18"):
        dm.setup("fit")
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "last tenth of its 4 training songs" in warned[0] and "Zed - Last" in warned[0]
    train, val = (set(dm.load_songs(split)[1]) for split in ("train", "val"))
    assert val == {"Zed - Last"} and train == set(names) - val
    assert len(dm.dataset("val")) > 0 and next(iter(dm.train_dataloader()))["sources"].shape == (4, 4, 1024)
    # A tree holding musdb's own validation songs keeps musdb's list, without a warning.
    caplog.clear()
    with caplog.at_level("WARNING", logger="datamodules.musdb18"):
        assert datamodule(hq_root, tmp_path / "cache").load_songs("val")[1] == [VALIDATION_NAME]
    assert not caplog.records


@pytest.mark.parametrize("n,held_out", [(2, 1), (3, 1), (19, 1), (20, 2), (86, 8)])
def test_own_validation_is_at_least_one_song_and_never_all(n, held_out):
    names = [f"song {i:03d}" for i in range(n)]
    assert musdb18.own_validation_names(names[::-1]) == names[n - held_out:]


def test_one_own_song_cannot_be_split(tmp_path):
    root = write_musdb_hq(tmp_path / "own", n_test=1, seconds=0.5, train_names=["Solo - Song"])
    with pytest.raises(DatasetLayoutError, match="at least 2"):
        datamodule(root, tmp_path / "cache").list_tracks("val")


def test_source_subset_and_order(hq_root, tmp_path):
    full = datamodule(hq_root, tmp_path / "cache")
    picked = datamodule(hq_root, tmp_path / "cache", sources=["vocals", "drums"])
    a, b = full.dataset("test")[0]["sources"], picked.dataset("test")[0]["sources"]
    assert b.shape == (2, 4096) and torch.equal(b, a[[3, 0]])
    with pytest.raises(ValueError, match="unknown musdb source.*guitar.*choose from"):
        datamodule(hq_root, tmp_path / "cache", sources=["guitar"])


def test_stems_mp4_decodes_the_same_music_in_the_right_order(hq_root, stems_root, tmp_path):
    # Both fixtures are generated from the same seed, so they hold the same audio (the .mp4 through AAC).
    hq = cached_songs(datamodule(hq_root, tmp_path / "a"), "test")
    mp4 = cached_songs(datamodule(stems_root, tmp_path / "b"), "test")
    assert sorted(hq) == sorted(mp4)
    for name in hq:
        x, y = hq[name], mp4[name]
        assert y.shape[0] == 4 and abs(y.shape[1] - x.shape[1]) < 2048  # AAC pads to whole frames
        n = min(x.shape[1], y.shape[1])
        for k in range(4):
            correlations = [np.corrcoef(x[j, :n], y[k, :n])[0, 1] for j in range(4)]
            assert int(np.argmax(correlations)) == k and correlations[k] > 0.9


def test_silent_stem_frames_are_filtered(tmp_path):
    root = write_musdb_hq(tmp_path / "data", n_train=2, n_test=1, seconds=4.0, silent_vocals_from=1.5)
    dm = datamodule(root, tmp_path / "cache", crop_length=2048, eval_length=2048)
    items = [dm.dataset("train")[i]["sources"] for i in range(len(dm.dataset("train")))]
    assert all((x.norm(dim=1) / 2048 >= 1.5e-5).all() for x in items)
    kept = [start for _, start in dm.dataset("test").frames]
    assert kept and max(kept) + 2048 <= int(1.5 * 16000) + 2048
    everything = datamodule(root, tmp_path / "cache", crop_length=2048, eval_length=2048, silence_threshold=0.0)
    assert len(everything.dataset("test")) == 4 * 16000 // 2048 > len(kept)


def test_stems_of_unequal_length_are_cut_to_the_shortest_with_a_warning(tmp_path):
    root = write_musdb_hq(tmp_path / "data", n_train=2, n_test=1, seconds=SECONDS)
    song = root / "train" / "Train Artist 00 - Song"
    audio, rate = soundfile.read(str(song / "bass.wav"), always_2d=True)
    soundfile.write(str(song / "bass.wav"), audio[: len(audio) - rate], rate)  # one second short
    dm = datamodule(root, tmp_path / "cache")
    expected = rf"{song.name}.*bass {SECONDS - 1:.2f} s.*cut to the shortest"
    with pytest.warns(musdb18.UnequalStemsWarning, match=expected):
        songs = cached_songs(dm, "train")
    assert songs[song.name].shape[1] == int((SECONDS - 1) * 16000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", musdb18.UnequalStemsWarning)  # the others are equal: no warning
        cached_songs(datamodule(write_musdb_hq(tmp_path / "equal", n_train=2, n_test=1, seconds=SECONDS),
                                tmp_path / "cache2"), "train")


def test_max_tracks_counts_songs_where_every_source_sounds(tmp_path):
    root = write_musdb_hq(tmp_path / "data", n_train=4, n_test=1, seconds=SECONDS)
    silent = root / "train" / "Train Artist 00 - Song" / "vocals.wav"  # the first training song, by name
    audio, rate = soundfile.read(str(silent), always_2d=True)
    soundfile.write(str(silent), np.zeros_like(audio), rate)
    dm = datamodule(root, tmp_path / "cache", max_tracks=2)
    assert len(dm.dataset("train").starts) == 2  # the silent song is left out and the next one taken instead
    drums_bass = datamodule(root, tmp_path / "cache", max_tracks=2, sources=["drums", "bass"])
    assert len(drums_bass.dataset("train").starts) == 2


def count_decodes(monkeypatch, log):
    original = musdb18.decode_track

    def counting(*args, **kwargs):
        with open(log, "a") as stream:
            stream.write("decoded\n")
        return original(*args, **kwargs)
    monkeypatch.setattr(musdb18, "decode_track", counting)
    return lambda: len(log.read_text().splitlines()) if log.exists() else 0


def test_cache_is_reused_and_rebuilt_when_a_stem_changes(tmp_path, monkeypatch):
    root = write_musdb_hq(tmp_path / "data", n_train=2, n_test=2, seconds=2.0)
    decodes = count_decodes(monkeypatch, tmp_path / "log")
    first = cached_songs(datamodule(root, tmp_path / "cache"), "test")
    assert decodes() == 2
    again = cached_songs(datamodule(root, tmp_path / "cache"), "test")
    assert decodes() == 2 and all(np.array_equal(first[n], again[n]) for n in first)
    changed = root / "test" / sorted(first)[0] / "drums.wav"
    audio, rate = soundfile.read(changed)
    soundfile.write(changed, audio * 0.5, rate, subtype="PCM_16")
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    rebuilt = cached_songs(datamodule(root, tmp_path / "cache"), "test")
    assert decodes() == 3  # only the changed track
    name = sorted(first)[0]
    np.testing.assert_allclose(rebuilt[name][0], first[name][0] * 0.5, atol=1e-4)
    np.testing.assert_array_equal(rebuilt[name][1], first[name][1])


def setup_in_process(root, cache, log):
    import datamodules.musdb18 as module

    original = module.decode_track

    def counting(*args, **kwargs):
        with open(log, "a") as stream:
            stream.write(f"{os.getpid()}\n")
        return original(*args, **kwargs)
    module.decode_track = counting
    datamodule(root, cache).setup("fit")


def test_concurrent_ranks_decode_each_track_once(tmp_path):
    root = write_musdb_hq(tmp_path / "data", n_train=3, n_test=1, seconds=2.0)
    log, context = tmp_path / "log", multiprocessing.get_context("spawn")
    ranks = [context.Process(target=setup_in_process, args=(root, tmp_path / "cache", log)) for _ in range(2)]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join(timeout=300)
        assert rank.exitcode == 0
    assert len(log.read_text().splitlines()) == 3  # 2 train + 1 validation track, each decoded by one rank


def test_root_errors_name_the_path_and_layout(tmp_path, monkeypatch):
    monkeypatch.delenv("MUSDB_ROOT", raising=False)
    with pytest.raises(DatasetLayoutError, match="(?s)MUSDB_ROOT.*Expected layout"):
        datamodule(None, tmp_path / "cache")
    with pytest.raises(DatasetLayoutError, match=f"(?s){tmp_path / 'nowhere'} does not exist.*stem.mp4"):
        datamodule(tmp_path / "nowhere", tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match=f"(?s){tmp_path / 'empty'} has no train/ folder.*mixture,drums"):
        datamodule(tmp_path / "empty", tmp_path / "cache").setup("fit")
    (tmp_path / "empty" / "train").mkdir()
    with pytest.raises(DatasetLayoutError, match="neither .stem.mp4 files nor track folders"):
        datamodule(tmp_path / "empty", tmp_path / "cache").setup("fit")


def test_a_bad_track_is_skipped_with_a_warning(tmp_path):
    root = write_musdb_hq(tmp_path / "data", n_train=1, n_test=3, seconds=2.0)
    names = sorted(p.name for p in (root / "test").iterdir())
    (root / "test" / names[0] / "vocals.wav").write_bytes(b"not audio at all")
    (root / "test" / names[1] / "bass.wav").unlink()
    with pytest.warns(SkippedTrackWarning) as caught:
        songs, kept = datamodule(root, tmp_path / "cache").load_songs("test")
    assert kept == [names[2]]
    messages = " ".join(str(w.message) for w in caught)
    assert names[0] in messages and names[1] in messages and "bass.wav" in messages
    # With every track bad, it stops and says why.
    (root / "test" / names[2] / "drums.wav").write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedTrackWarning)
        with pytest.raises(DatasetLayoutError, match="no usable musdb18 track in split 'test'"):
            datamodule(root, tmp_path / "cache2").load_songs("test")
