"""Real-music edge cases the toy data never has (issue 29, item 3), on tiny songs written in tmp_path in the
MUSDB18-HQ and Slakh2100 layouts and read through the real datamodules, built from the experiments' own
configs (musdb_flow, slakh_flow) by datamodules.registry.build_datamodule:

* a stem silent for the first half of a song: paper 002's rule ||x_k||_2 / L < data.silence_threshold drops
  exactly the frames that do not reach its sounding half, measured on the audio at the datamodule's rate
  (a 20 kHz tone, loud at 44.1 kHz, is silence at 16 or 22.05 kHz); data.silence_threshold=0 serves all;
* a class absent from a song (Slakh: not in metadata.yaml; musdb: a vocals.wav of zeros): the song is left
  out with a warning when the class is requested, used when it is not; a split where every song lacks it
  stops with an error naming the class, the split and the fix;
* stereo and mono files at 44.1, 22.05 and 16 kHz, also mixed inside one song: served mono (the mean of the
  channels) at the experiment's rate, a sine keeping its frequency and amplitude; the mix is the sum of the
  served stems (dataset_mixing) and, for Slakh, matches the track's own mix.flac;
* several Slakh stems of one inst_class are summed into that class; a stem not rendered is not.
"""
import logging

import numpy as np
import pytest
import soundfile
import torch
import torchaudio
import yaml

from datamodules.registry import build_datamodule, dataset_mixing
from datamodules.stem_datamodule import DatasetLayoutError
from datamodules.stem_frames import frame_stride
from experiments.config import load_config

MUSDB, SLAKH = "musdb_flow", "slakh_flow"
NATIVE = 44100
THRESHOLD = 1.5e-5  # paper 002's rule; the experiments' default, asserted below
# Per musdb stem / Slakh class: a distinct audible tone (Hz) and its amplitude (sums stay below 1).
TONES = {"drums": (200.0, 0.2), "bass": (110.0, 0.25), "other": (523.0, 0.15), "vocals": (880.0, 0.2),
         "guitar": (523.0, 0.15), "piano": (880.0, 0.2), "strings": (660.0, 0.1)}


# ----------------------------------------------------------------------------------------------------------
# Writing fixture songs


def tone(frequency, amplitude, seconds, rate):
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def ultrasonic(seconds, rate, frequency=20000.0, amplitude=0.3, fade=0.02):
    """A 20 kHz tone: loud in a 44.1 kHz file, above the Nyquist frequency of both experiments' rates. Faded in
    and out, so that its edges, too, leave almost nothing below that frequency."""
    wave = tone(frequency, amplitude, seconds, rate)
    ramp = np.sin(0.5 * np.pi * np.arange(int(fade * rate)) / int(fade * rate)) ** 2
    wave[:len(ramp)] *= ramp
    wave[len(wave) - len(ramp):] *= ramp[::-1]
    return wave


def stereo(left, right):
    return np.stack([left, right], axis=1)


def musdb_song(root, split, name, stems=None, mixture_rate=NATIVE, mixture_channels=2, seconds=2.0):
    """<root>/<split>/<name>/{mixture,drums,bass,other,vocals}.wav. ``stems``: {stem: (audio [T] or [T, C],
    rate)}; the others are their TONES, stereo at 44.1 kHz. The mixture is only the layout's: the datamodule
    serves the sum of the stems, so it is written at its own rate and channel count from the plain tones."""
    stems = dict(stems or {})
    folder = root / split / name
    folder.mkdir(parents=True)
    for stem in ("drums", "bass", "other", "vocals"):
        audio, rate = stems.get(stem) or (stereo(*[tone(*TONES[stem], seconds, NATIVE)] * 2), NATIVE)
        soundfile.write(folder / f"{stem}.wav", audio, rate, subtype="PCM_16")
    mixture = sum(tone(*TONES[stem], seconds, mixture_rate) for stem in ("drums", "bass", "other", "vocals"))
    soundfile.write(folder / "mixture.wav", np.stack([mixture] * mixture_channels, axis=1), mixture_rate,
                    subtype="PCM_16")
    return folder


def slakh_track(root, split, name, stems, seconds=2.0):
    """<root>/<split>/<name>/{metadata.yaml, stems/Sxx.flac, mix.flac}. ``stems``: [(inst_class, audio or None
    for the class's TONE at 44.1 kHz, rate, rendered)]. mix.flac, as in Slakh, is the sum of the rendered
    stems (written only when they share a rate)."""
    folder = root / split / name
    (folder / "stems").mkdir(parents=True)
    metadata, rendered = {}, []
    for index, (inst_class, audio, rate, is_rendered) in enumerate(stems):
        if audio is None:
            audio, rate = tone(*TONES[inst_class.strip().lower()], seconds, NATIVE), NATIVE
        soundfile.write(folder / "stems" / f"S{index:02d}.flac", audio, rate)
        metadata[f"S{index:02d}"] = {"inst_class": inst_class, "audio_rendered": is_rendered, "program_num": index,
                                     "is_drum": inst_class.lower() == "drums"}
        if is_rendered:
            rendered.append((audio if audio.ndim == 2 else audio[:, None], rate))
    (folder / "metadata.yaml").write_text(yaml.safe_dump({"audio_dir": "stems", "stems": metadata}))
    if len({rate for _, rate in rendered}) == 1:
        length = min(len(audio) for audio, _ in rendered)
        channels = max(audio.shape[1] for audio, _ in rendered)
        total = sum(np.broadcast_to(audio[:length], (length, channels)) for audio, _ in rendered)
        soundfile.write(folder / "mix.flac", total, rendered[0][1])
    return folder


def plain(*classes):
    """Slakh stems: each class's TONE at 44.1 kHz, rendered."""
    return [(c, None, NATIVE, True) for c in classes]


FULL = ("Drums", "Bass", "Guitar", "Piano")


# ----------------------------------------------------------------------------------------------------------
# Reading through the real datamodules


def datamodule(experiment, root, tmp_path, *overrides):
    """The experiment's data section (its sample rate, frame lengths, threshold), on ``root``."""
    config = load_config(experiment, overrides=[f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}",
                                                "data.frames_per_song=20", *overrides])
    return build_datamodule(config.data, seed=0, output_root=str(tmp_path))


def experiment_data(experiment):
    return load_config(experiment).data


def served(dataset):
    return [dataset[i] for i in range(len(dataset))]


def peak_hz(wave, rate):
    """The frequency of the largest peak of the (Hann-windowed, 8x zero-padded) spectrum."""
    wave = np.asarray(wave, dtype=np.float64)
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave)), n=8 * len(wave)))
    return np.argmax(spectrum) * rate / (8 * len(wave))


def tone_fit(wave, rate, frequency):
    """(amplitude of the ``frequency`` component, RMS of what is left), by least squares on a sine and a
    cosine (exact for a sum of sines a few periods apart in frequency)."""
    wave = np.asarray(wave, dtype=np.float64)
    t = np.arange(len(wave)) / rate
    basis = np.stack([np.sin(2 * np.pi * frequency * t), np.cos(2 * np.pi * frequency * t)], axis=1)
    coefficients = np.linalg.lstsq(basis, wave, rcond=None)[0]
    return float(np.hypot(*coefficients)), float(np.sqrt(np.mean((wave - basis @ coefficients) ** 2)))


def amplitude_at(wave, rate, frequency):
    return tone_fit(wave, rate, frequency)[0]


def assert_tone(wave, rate, frequency, amplitude, where):
    """One sine of this frequency and amplitude; the rest only resampler and 16-bit quantisation error."""
    peak = peak_hz(wave, rate)
    assert abs(peak - frequency) < 1.0, f"{where}: spectrum peak at {peak:.1f} Hz, expected {frequency} Hz"
    measured, rest = tone_fit(wave, rate, frequency)
    assert measured == pytest.approx(amplitude, rel=0.02), f"{where}: amplitude {measured:.4f}, expected {amplitude}"
    assert rest < 0.02 * amplitude, f"{where}: {rest:.4f} RMS besides the tone"


def test_the_experiments_rates_and_threshold():
    """What the tests below assume of the experiments' data sections."""
    for experiment, name in ((MUSDB, "musdb18"), (SLAKH, "slakh2100")):
        data = experiment_data(experiment)
        assert data.name == name and data.silence_threshold == THRESHOLD
        assert data.sample_rate / 2 < 20000 < NATIVE / 2  # the 20 kHz tone: in the files, above the rate served
    assert experiment_data(MUSDB).sample_rate == 16000 and experiment_data(SLAKH).sample_rate == 22050


# ----------------------------------------------------------------------------------------------------------
# 1. A stem silent for the first half of a song


SONG_SECONDS, SOUNDING_FROM = 3.0, 1.5


def half_silent_bass(first_half, rate):
    """The bass: ``first_half`` ("zeros" or a 20 kHz tone) up to SOUNDING_FROM, then its audible TONE."""
    head = np.zeros(int(SOUNDING_FROM * rate), dtype=np.float32) if first_half == "zeros" else \
        ultrasonic(SOUNDING_FROM, rate)
    tail = tone(*TONES["bass"], SONG_SECONDS, rate)[len(head):]
    return np.concatenate([head, tail])


def half_silent_tree(layout, root, first_half):
    """The half-silent song in train and test, and a plain song (the musdb layout's held-out validation
    song, the last tenth by name; Slakh's validation/ folder)."""
    bass = half_silent_bass(first_half, NATIVE)
    if layout == MUSDB:
        for split, name in (("train", "A - Half Silent"), ("test", "A - Half Silent")):
            musdb_song(root, split, name, {"bass": (stereo(bass, 0.5 * bass), NATIVE)}, seconds=SONG_SECONDS)
        musdb_song(root, "train", "Z - Plain", seconds=SONG_SECONDS)
    else:
        for split in ("train", "test"):
            slakh_track(root, split, "Track00001", [("Drums", None, NATIVE, True), ("Bass", bass, NATIVE, True),
                                                    *plain("Guitar", "Piano")], seconds=SONG_SECONDS)
        slakh_track(root, "validation", "Track00001", plain(*FULL), seconds=SONG_SECONDS)


@pytest.mark.parametrize("first_half", ["zeros", "ultrasonic"])
@pytest.mark.parametrize("layout", [MUSDB, SLAKH])
def test_a_stem_silent_in_the_first_half(layout, first_half, tmp_path):
    half_silent_tree(layout, tmp_path / "data", first_half)
    dm = datamodule(layout, tmp_path / "data", tmp_path)
    rate, crop, length = dm.sample_rate, dm.crop_length, dm.eval_length
    assert dm.silence_threshold == THRESHOLD
    total, boundary = int(SONG_SECONDS * rate), int(SOUNDING_FROM * rate)  # at the datamodule's rate
    # The grid frames that reach into the sounding half, and no other: none ends within a resampler's reach
    # of the boundary, so the expectation is exact.
    grid = frame_stride(crop)  # training starts lie on this grid
    assert all(abs(s + crop - boundary) > 16 for s in range(0, total, grid))
    assert all(abs(s + length - boundary) > 16 for s in range(0, total, length))

    train, test = dm.dataset("train"), dm.dataset("test")
    assert len(train.starts) == 1 and len(test.songs) == 1
    assert train.starts[0].tolist() == [s for s in range(0, total - crop + 1, grid) if s + crop > boundary]
    assert [start for _, start in test.frames] == [s for s in range(0, total - length + 1, length)
                                                   if s + length > boundary]
    # What the model sees: every served source, training and evaluation, passes the rule.
    for item in served(train) + served(test):
        assert (item["sources"].norm(dim=1) / item["sources"].shape[1] >= THRESHOLD).all()
    # The rule is measured at the datamodule's rate: the 20 kHz head is loud in the 44.1 kHz file ...
    native = half_silent_bass(first_half, NATIVE)[:int(length * NATIVE / rate)]
    loud = np.linalg.norm(native) / len(native) >= THRESHOLD
    assert loud == (first_half == "ultrasonic")
    # ... and silence once resampled, as the cached song shows.
    song = np.asarray(test.songs.array(0))
    assert song.shape[1] == total
    assert np.linalg.norm(song[1, :length]) / length < THRESHOLD / 5

    everything = datamodule(layout, tmp_path / "data", tmp_path, "data.silence_threshold=0")
    assert everything.dataset("train").starts[0].tolist() == list(range(0, total - crop + 1, grid))
    assert [start for _, start in everything.dataset("test").frames] == list(range(0, total - length + 1, length))


# ----------------------------------------------------------------------------------------------------------
# 2. A class absent from a song


def logged_warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.name.startswith("datamodules.")]


def test_musdb_a_song_without_vocals(tmp_path, caplog):
    root, seconds = tmp_path / "data", 1.0
    zeros = np.zeros((int(seconds * NATIVE), 2), dtype=np.float32)
    # Train: one song with a vocals.wav of zeros, one full; the third ("Z") is held out for validation.
    musdb_song(root, "train", "A - No Vocals", {"vocals": (zeros, NATIVE),
                                                "drums": (stereo(*[tone(300.0, 0.2, seconds, NATIVE)] * 2), NATIVE)},
               seconds=seconds)
    musdb_song(root, "train", "B - Full", seconds=seconds)
    musdb_song(root, "train", "Z - Held Out", seconds=seconds)
    for name in ("C - No Vocals", "D - No Vocals"):
        musdb_song(root, "test", name, {"vocals": (zeros, NATIVE)}, seconds=seconds)

    # Vocals requested: the song without them is left out with a warning naming it; the full one is served.
    dm = datamodule(MUSDB, root, tmp_path)
    with caplog.at_level(logging.WARNING):
        train = dm.dataset("train")
    warned = logged_warnings(caplog)
    assert any("A - No Vocals" in m and "vocals" in m for m in warned) and not any("B - Full" in m for m in warned)
    assert len(train.starts) == 1
    for item in served(train):
        assert abs(peak_hz(item["sources"][0], dm.sample_rate) - TONES["drums"][0]) < 2  # B's drums, not A's
        assert (item["sources"].norm(dim=1) / dm.crop_length >= THRESHOLD).all()

    # Vocals not requested: the song is used.
    caplog.clear()
    without = datamodule(MUSDB, root, tmp_path, "data.sources=[drums,bass,other]")
    with caplog.at_level(logging.WARNING):
        assert len(without.dataset("train").starts) == 2
    assert not any("No Vocals" in m for m in logged_warnings(caplog))
    assert len(without.dataset("test")) > 0
    # "0 keeps everything": the silent vocals are served too.
    assert len(datamodule(MUSDB, root, tmp_path, "data.silence_threshold=0").dataset("train").starts) == 2

    # Every test song lacks vocals: the error names the class, the split and both ways out.
    with pytest.raises(DatasetLayoutError) as error:
        dm.setup("test")
    message = str(error.value)
    for needed in ("'vocals'", "test", "data.sources", "data.silence_threshold"):
        assert needed in message, f"{needed!r} missing from: {message}"


def test_slakh_a_track_without_piano(tmp_path, caplog):
    root, seconds = tmp_path / "data", 1.0
    slakh_track(root, "train", "Track00001", plain("Drums", "Bass", "Guitar"), seconds=seconds)
    slakh_track(root, "train", "Track00002", plain(*FULL), seconds=seconds)
    slakh_track(root, "validation", "Track00001", plain(*FULL), seconds=seconds)
    slakh_track(root, "test", "Track00001", plain("Drums", "Bass", "Guitar", "Strings"), seconds=seconds)
    slakh_track(root, "test", "Track00002", plain("Drums", "Bass", "Guitar"), seconds=seconds)

    dm = datamodule(SLAKH, root, tmp_path)
    with caplog.at_level(logging.WARNING):
        songs, names = dm.load_songs("train")
        train = dm.dataset("train")
    assert names == ["Track00002"] and len(train.starts) == 1
    warned = logged_warnings(caplog)
    assert any("Track00001" in m and "piano" in m for m in warned), warned

    caplog.clear()
    without = datamodule(SLAKH, root, tmp_path, "data.sources=[drums,bass,guitar]")
    with caplog.at_level(logging.WARNING):
        assert without.load_songs("train")[1] == ["Track00001", "Track00002"]
        assert len(without.dataset("train").starts) == 2 and len(without.dataset("test")) > 0
    assert not logged_warnings(caplog)

    # No test track has piano: the error names the class, the split and the fix.
    with pytest.raises(DatasetLayoutError) as error:
        dm.setup("test")
    message = str(error.value)
    for needed in ("'piano'", "test", "data.sources", "classes found: ['bass', 'drums', 'guitar', 'strings']"):
        assert needed in message, f"{needed!r} missing from: {message}"


def test_slakh_a_class_rendered_silent_in_every_track(tmp_path):
    """The class is in metadata.yaml but its audio is all zeros: the silence rule, not the metadata, rules it
    out; the error says which class is silent and how to get out."""
    root, seconds = tmp_path / "data", 1.0
    zeros = np.zeros(int(seconds * NATIVE), dtype=np.float32)
    slakh_track(root, "train", "Track00001", plain(*FULL), seconds=seconds)
    for name in ("Track00001", "Track00002"):
        slakh_track(root, "validation", name, plain("Drums", "Bass", "Guitar") + [("Piano", zeros, NATIVE, True)],
                    seconds=seconds)
    slakh_track(root, "test", "Track00001", plain(*FULL), seconds=seconds)
    with pytest.raises(DatasetLayoutError) as error:
        datamodule(SLAKH, root, tmp_path).setup("validate")
    message = str(error.value)
    for needed in ("'piano'", "val", "data.sources", "data.silence_threshold"):
        assert needed in message, f"{needed!r} missing from: {message}"
    assert len(datamodule(SLAKH, root, tmp_path, "data.silence_threshold=0").dataset("val")) > 0


# ----------------------------------------------------------------------------------------------------------
# 3. Stereo and mono files, and sample rates


def mixed_musdb_tree(root, seconds):
    """Four test songs: 44.1 kHz stereo; 22.05 kHz mono; 16 kHz mono; and one mixing rates and channel counts
    in one song. Returns {song: {stem: (frequency, amplitude the served mono audio must have)}}."""
    expected = {}

    def song(name, stems, **mixture):
        musdb_song(root, "test", name, {s: (audio, rate) for s, (audio, rate, _) in stems.items()},
                   seconds=seconds, **mixture)
        expected[name] = {s: (TONES[s][0], served) for s, (_, _, served) in stems.items()}

    def mono(stem, rate, gain=1.0):
        frequency, amplitude = TONES[stem]
        return tone(frequency, gain * amplitude, seconds, rate), rate, gain * amplitude

    def two_channels(stem, rate, left, right):
        """Left and right the same tone at gains ``left`` and ``right``: their mean has (left + right) / 2."""
        frequency, amplitude = TONES[stem]
        audio = stereo(tone(frequency, left * amplitude, seconds, rate), tone(frequency, right * amplitude, seconds,
                                                                                rate))
        return audio, rate, (left + right) / 2 * amplitude

    song("S - Stereo 44k", {s: two_channels(s, NATIVE, 1.6, 0.4) for s in ("drums", "bass", "other", "vocals")})
    song("M - Mono 22k", {s: mono(s, 22050) for s in ("drums", "bass", "other", "vocals")},
         mixture_rate=22050, mixture_channels=1)
    song("N - Mono 16k", {s: mono(s, 16000) for s in ("drums", "bass", "other", "vocals")},
         mixture_rate=16000, mixture_channels=1)
    song("X - Mixed", {"drums": two_channels("drums", NATIVE, 1.5, 0.5), "bass": mono("bass", 22050),
                       "other": mono("other", 16000), "vocals": two_channels("vocals", 22050, 1.0, 0.0)})
    for name in ("A - Plain", "B - Plain"):
        musdb_song(root, "train", name, seconds=seconds)
    return expected


def mixed_slakh_tree(root, seconds):
    """Three test tracks: 44.1 kHz (drums stereo); 16 kHz mono; one mixing 44.1, 22.05 and 16 kHz, stereo and
    mono. Returns {track: {class: (frequency, served amplitude)}}."""
    def at(inst_class, rate, left=1.0, right=None):
        frequency, amplitude = TONES[inst_class.lower()]
        audio = tone(frequency, left * amplitude, seconds, rate)
        if right is not None:
            audio = stereo(audio, tone(frequency, right * amplitude, seconds, rate))
        served = amplitude * (left if right is None else (left + right) / 2)
        return (inst_class, audio, rate, True), (frequency, served)

    tracks = {"Track00001": [at("Drums", NATIVE, 1.6, 0.4), at("Bass", NATIVE), at("Guitar", NATIVE),
                             at("Piano", NATIVE)],
              "Track00002": [at(c, 16000) for c in FULL],
              "Track00003": [at("Drums", NATIVE, 0.5, 1.5), at("Bass", 16000), at("Guitar", 22050),
                             at("Piano", NATIVE, 1.0, 1.0)]}
    for name, stems in tracks.items():
        slakh_track(root, "test", name, [stem for stem, _ in stems], seconds=seconds)
    for split in ("train", "validation"):
        slakh_track(root, split, "Track00001", plain(*FULL), seconds=seconds)
    return {name: {c.lower(): e for (c, *_), e in stems} for name, stems in tracks.items()}


@pytest.mark.parametrize("layout", [MUSDB, SLAKH])
def test_stereo_mono_and_rates_are_served_mono_at_the_experiments_rate(layout, tmp_path):
    root, seconds = tmp_path / "data", 2.0
    expected = (mixed_musdb_tree if layout == MUSDB else mixed_slakh_tree)(root, seconds)
    # One long evaluation frame per song, for a fine spectrum.
    dm = datamodule(layout, root, tmp_path, "data.eval_length=16384")
    rate, length = dm.sample_rate, dm.eval_length
    _, names = dm.load_songs("test")
    assert names == sorted(expected)
    test = dm.dataset("test")
    assert len(test.songs) == len(names)
    for index, item in enumerate(served(test)):
        song, start = test.frames[index]
        name = names[song]
        # Every song keeps its duration at the new rate, whatever its files' rates and channel counts.
        assert np.asarray(test.songs.array(song)).shape[1] == pytest.approx(seconds * rate, abs=1), name
        sources = item["sources"]
        assert sources.shape == (len(dm.sources), length) and item["mix"].shape == (length,)
        for row, source in enumerate(dm.sources):
            frequency, amplitude = expected[name][source]
            assert_tone(sources[row].numpy(), rate, frequency, amplitude, f"{name} {source} frame at {start}")
        # The mix is the sum of the served stems: the datamodule's mixing rule, which the separation follows.
        assert dataset_mixing(dm.dataset_name) == "sum"
        torch.testing.assert_close(item["mix"], sources.sum(dim=0))
        if layout == SLAKH and (root / "test" / name / "mix.flac").is_file():
            # ... and it is the track's own mix.flac, downmixed and resampled the same way.
            audio, native = soundfile.read(root / "test" / name / "mix.flac", dtype="float32", always_2d=True)
            mix = torchaudio.functional.resample(torch.from_numpy(audio.mean(axis=1)), native, rate)
            torch.testing.assert_close(item["mix"], mix[start:start + length], atol=2e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# 4. Several Slakh stems of one class


def test_slakh_stems_of_one_class_are_summed(tmp_path):
    root, seconds = tmp_path / "data", 2.0
    first = tone(523.0, 0.15, seconds, NATIVE)
    second = tone(1046.0, 0.1, seconds, 16000)[:-3]  # another rate, and a few samples shorter
    third = stereo(tone(1568.0, 0.2, seconds, 22050), tone(1568.0, 0.0, seconds, 22050))
    unrendered = tone(2000.0, 0.3, seconds, NATIVE)
    slakh_track(root, "test", "Track00001", plain("Drums", "Bass") + [
        ("Guitar", first, NATIVE, True), ("Piano", None, NATIVE, True), ("guitar ", second, 16000, True),
        ("GUITAR", third, 22050, True), ("Guitar", unrendered, NATIVE, False)], seconds=seconds)
    for split in ("train", "validation"):
        slakh_track(root, split, "Track00001", plain(*FULL), seconds=seconds)
    dm = datamodule(SLAKH, root, tmp_path, "data.eval_length=16384")
    rate = dm.sample_rate
    guitar = dm.sources.index("guitar")
    item = dm.dataset("test")[0]
    wave = item["sources"][guitar].numpy()
    # Three rendered guitar stems: each tone at its amplitude (the stereo one: the mean of its channels) ...
    for frequency, amplitude in ((523.0, 0.15), (1046.0, 0.1), (1568.0, 0.1)):
        assert amplitude_at(wave, rate, frequency) == pytest.approx(amplitude, rel=0.02), frequency
    # ... and not the stem metadata.yaml marks as not rendered.
    assert amplitude_at(wave, rate, 2000.0) < 1e-3
    # The class is exactly the sum of its stems, each converted on its own.
    def converted(audio, native):
        audio = torch.from_numpy(np.asarray(audio, dtype=np.float32).reshape(len(audio), -1).mean(axis=1))
        return torchaudio.functional.resample(audio, native, rate)
    parts = [converted(*args) for args in ((first, NATIVE), (second, 16000), (third, 22050))]
    total = sum(torch.nn.functional.pad(p, (0, int(seconds * rate) - len(p)))[:len(wave)] for p in parts)
    torch.testing.assert_close(torch.from_numpy(wave), total[:len(wave)], atol=2e-4, rtol=0)
