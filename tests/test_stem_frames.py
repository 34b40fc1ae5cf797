"""Frames cut from cached songs: the silent-frame rule against a brute-force check, the fixed
evaluation list, reproducible random training frames, and cheap pickling for DataLoader workers."""
import pickle

import numpy as np
import pytest
import torch

from datamodules.stem_frames import FixedFrames, RandomFrames, SongArrays, frame_norms, frame_stride, valid_starts


def song_with_gap(tmp_path, name="song.npy", length=20_000, gap=(6_000, 12_000)):
    song = np.random.default_rng(0).uniform(-0.5, 0.5, (3, length)).astype(np.float32)
    song[1, gap[0]:gap[1]] = 0.0  # source 1 is silent in the gap
    np.save(tmp_path / name, song)
    return song, tmp_path / name


@pytest.mark.parametrize("length", [1024, 1000, 300])
def test_frame_norms_match_brute_force(tmp_path, length):
    song, _ = song_with_gap(tmp_path)
    stride = frame_stride(length)
    norms = frame_norms(song, length, stride)
    for index in [0, 1, 7, norms.shape[1] - 1]:
        start = index * stride
        expected = np.linalg.norm(song[:, start:start + length].astype(np.float64), axis=1) / length
        np.testing.assert_allclose(norms[:, index], expected, rtol=1e-9)
    assert (norms.shape[1] - 1) * stride + length <= song.shape[1] < norms.shape[1] * stride + length


def test_frames_with_any_silent_source_are_dropped(tmp_path):
    song, _ = song_with_gap(tmp_path)
    length = 1024
    starts = valid_starts(song, length, threshold=1.5e-5)
    assert len(starts) > 0
    for start in starts:
        assert (np.linalg.norm(song[:, start:start + length], axis=1) / length >= 1.5e-5).all()
    # Every frame lying inside the gap is gone; frames clear of it on either side stay.
    assert not any(6_000 <= s and s + length <= 12_000 for s in starts)
    assert 0 in starts and any(s >= 12_000 for s in starts)
    # Only source 0 and 2 asked for: the gap no longer matters.
    assert len(valid_starts(song, length, 1.5e-5, rows=[0, 2])) > len(starts)
    # A threshold of 0 keeps every frame.
    assert len(valid_starts(song, length, 0.0)) == (song.shape[1] - length) // frame_stride(length) + 1


def test_fixed_frames_round_robin_and_cap(tmp_path):
    _, first = song_with_gap(tmp_path, "a.npy")
    _, second = song_with_gap(tmp_path, "b.npy", length=8_000, gap=(0, 0))
    songs = SongArrays([first, second], rows=[2, 0])
    starts = [songs.valid_starts(i, 1024, 1.5e-5) for i in range(2)]
    frames = FixedFrames(songs, starts, 1024)
    assert [song for song, _ in frames.frames[:4]] == [0, 1, 0, 1]
    assert all(start % 1024 == 0 for _, start in frames.frames)
    item = frames[1]
    expected = np.load(second)[[2, 0], frames.frames[1][1]:frames.frames[1][1] + 1024]
    np.testing.assert_array_equal(item["sources"].numpy(), expected)
    assert torch.allclose(item["mix"], item["sources"].mean(dim=0))
    assert len(FixedFrames(songs, starts, 1024, max_items=3)) == 3


def test_random_frames_are_valid_and_reproducible(tmp_path):
    song, path = song_with_gap(tmp_path)
    songs = SongArrays([path], rows=[0, 1, 2])
    starts = [songs.valid_starts(0, 512, 1.5e-5)]
    dataset = RandomFrames(songs, starts, 512, frames_per_song=20)
    assert len(dataset) == 20
    torch.manual_seed(3)
    first = [dataset[i]["sources"] for i in range(20)]
    torch.manual_seed(3)
    again = [dataset[i]["sources"] for i in range(20)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert len({float(x[0, 0]) for x in first}) > 5  # different positions
    assert all((x.norm(dim=1) / 512 >= 1.5e-5).all() for x in first)
    with pytest.raises(IndexError):
        dataset[20]


def test_song_arrays_pickle_without_their_data(tmp_path):
    _, path = song_with_gap(tmp_path)
    songs = SongArrays([path], rows=[0])
    songs.array(0)  # opened
    assert len(pickle.dumps(songs)) < 1000
    restored = pickle.loads(pickle.dumps(songs))
    np.testing.assert_array_equal(restored.array(0), songs.array(0))
