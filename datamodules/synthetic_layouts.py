"""Tiny synthetic datasets on disk in the real layouts (MUSDB18-HQ, MUSDB18 STEMS .mp4, Slakh2100).

The tests and ``make bench`` use them; a user can point MUSDB_ROOT at one to smoke-test a setup
without the real data. The audio is made up (tones with envelopes and noise bursts); only the folder
layout, file formats and sample rates are the real ones.
"""
from pathlib import Path

import numpy as np
import soundfile
import yaml

from datamodules.musdb18 import STEMS, musdb_setup

# A training song name from musdb's own validation list, so the fixture has a validation split.
VALIDATION_NAME = "Actions - One Minute Smile"


def synthetic_stem(rng, seconds, rate, channels=2, silent_from=None):
    """[T, channels] float32: a tone with a slow envelope plus a little noise, in [-0.5, 0.5]."""
    t = np.arange(int(seconds * rate)) / rate
    frequency = 55.0 * 2 ** rng.uniform(0, 5)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.2, 2.0) * t + rng.uniform(0, 2 * np.pi)) ** 2
    wave = 0.3 * envelope * np.sin(2 * np.pi * frequency * t) + 0.02 * rng.standard_normal(len(t))
    if silent_from is not None:
        wave[int(silent_from * rate):] = 0.0
    pan = rng.uniform(0.6, 1.0, size=channels)
    return (wave[:, None] * pan[None, :]).astype(np.float32)


def musdb_track_names(n_train, n_test, train_names=None):
    if train_names is None:
        train_names = [VALIDATION_NAME] + [f"Train Artist {i:02d} - Song" for i in range(n_train - 1)]
    return {"train": list(train_names), "test": [f"Test Artist {i:02d} - Song" for i in range(n_test)]}


def musdb_stems(rng, seconds, rate, silent_vocals_from=None):
    return {name: synthetic_stem(rng, seconds, rate, silent_from=silent_vocals_from if name == "vocals" else None)
            for name in STEMS}


def write_musdb_hq(root, n_train=3, n_test=2, seconds=3.0, rate=44100, seed=0, silent_vocals_from=None,
                   train_names=None):
    """MUSDB18-HQ layout: <root>/{train,test}/<track>/{mixture,drums,bass,other,vocals}.wav. ``train_names``
    replaces the training songs (by default one from musdb's validation list and n_train - 1 others)."""
    root, rng, setup = Path(root), np.random.default_rng(seed), musdb_setup()
    for subset, names in musdb_track_names(n_train, n_test, train_names).items():
        for name in names:
            folder = root / subset / name
            folder.mkdir(parents=True, exist_ok=True)
            stems = musdb_stems(rng, seconds, rate, silent_vocals_from)
            for stem, audio in stems.items():
                soundfile.write(folder / setup["sources"][stem], audio, rate, subtype="PCM_16")
            soundfile.write(folder / setup["mixture"], sum(stems.values()), rate, subtype="PCM_16")
    return root


def write_musdb_stems(root, n_train=3, n_test=2, seconds=3.0, rate=44100, seed=0):
    """MUSDB18 STEMS layout: <root>/{train,test}/<track>.stem.mp4, five AAC streams (mixture first)."""
    import stempeg  # only needed to write this layout

    root, rng, setup = Path(root), np.random.default_rng(seed), musdb_setup()
    for subset, names in musdb_track_names(n_train, n_test).items():
        (root / subset).mkdir(parents=True, exist_ok=True)
        for name in names:
            stems = musdb_stems(rng, seconds, rate)
            order = sorted(setup["stem_ids"], key=setup["stem_ids"].get)  # mixture, drums, bass, other, vocals
            stems["mixture"] = sum(stems.values())
            data = np.stack([stems[stem] for stem in order])
            stempeg.write_stems(str(root / subset / f"{name}.stem.mp4"), data, sample_rate=rate,
                                writer=stempeg.StreamsWriter(codec="aac", bitrate=128000))
    return root


def write_slakh(root, tracks, seconds=3.0, rate=44100, seed=0, extension="flac"):
    """Slakh2100 layout. ``tracks``: {folder (train/validation/test): [[inst_class of S00, S01, ...], ...]};
    ``extension``: the stems' audio format (flac as distributed; wav as in converted copies)."""
    root, rng = Path(root), np.random.default_rng(seed)
    for split, track_classes in tracks.items():
        for number, classes in enumerate(track_classes):
            folder = root / split / f"Track{number + 1:05d}"
            (folder / "stems").mkdir(parents=True, exist_ok=True)
            stems = {}
            for index, inst_class in enumerate(classes):
                stem = f"S{index:02d}"
                soundfile.write(folder / "stems" / f"{stem}.{extension}", synthetic_stem(rng, seconds, rate, channels=1), rate)
                stems[stem] = {"inst_class": inst_class, "audio_rendered": True, "program_num": index}
            (folder / "metadata.yaml").write_text(yaml.safe_dump({"audio_dir": "stems", "stems": stems}))
    return root
