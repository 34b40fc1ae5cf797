"""One demo song written in both layouts the datamodules read.

MUSDB18-HQ: ``musdb/{train,test}/<name>/{mixture,drums,bass,other,vocals}.wav``, 44.1 kHz stereo 16-bit (the
validation songs sit in ``train/``, as musdb's own do). Slakh2100: ``slakh/{train,validation,test}/TrackNNNNN/``
with ``mix.flac``, ``stems/Sxx.flac`` (44.1 kHz mono 16-bit), ``MIDI/Sxx.mid`` and ``metadata.yaml`` in
Slakh's keys. Every file is written atomically (temp file, then rename), so an interrupted build leaves
whole files only.
"""
import io
import uuid
from dataclasses import dataclass

import numpy as np
import soundfile
import yaml

from datamodules.atomic_io import atomic_write, atomic_write_text
from datamodules.demo_data.midi_file import Note, midi_bytes
from datamodules.demo_data.mixing import exact_sum, to_mono
from datamodules.musdb18 import STEMS, musdb_setup

MUSDB_FOLDERS = {"train": "train", "validation": "train", "test": "test"}
PLUGIN_NAME = "FluidR3_GM.sf2"
UUID_NAMESPACE = uuid.UUID("6f1c1f9e-3d0a-4c55-9a57-0d6c3b0e5a21")  # fixed, so the UUIDs repeat on a rebuild


@dataclass
class Song:
    """A song's place in the set: its number (Slakh's track number too), split, piece and 0-based window."""
    number: int
    split: str
    piece: object
    window: int
    width: int = 3

    @property
    def musdb_name(self):
        # The number leads, so sorted names put validation songs after training ones (see build.py).
        return f"Demo {self.number:0{self.width}d} - {self.piece.title} {self.window + 1}"

    @property
    def track_name(self):
        return f"Track{self.number:05d}"


def audio_bytes(data, rate, container):
    buffer = io.BytesIO()
    soundfile.write(buffer, data, rate, format=container, subtype="PCM_16")
    return buffer.getvalue()


def write_audio(path, data, rate, container):
    payload = audio_bytes(np.asarray(data, dtype=np.int16), rate, container)
    atomic_write(path, lambda stream: stream.write(payload), binary=True)


def window_notes(notes, start, end):
    """The notes sounding in [start, end) quarter notes, shifted to start at 0 and cut at the end."""
    out = []
    for note in notes:
        onset, stop = max(note.onset, start), min(note.onset + note.duration, end)
        if stop > onset:
            out.append(Note(onset - start, stop - onset, note.pitch, note.velocity))
    return out


def write_musdb(root, song, stems, integers, rate):
    """The musdb song folder: each musdb stem the integer sum of its stems, the mixture the sum of all."""
    setup = musdb_setup()
    folder = root / "musdb" / MUSDB_FOLDERS[song.split] / song.musdb_name
    silent = np.zeros_like(integers[0], dtype=np.int16)
    for name in STEMS:
        members = [values for stem, values in zip(stems, integers) if stem.musdb == name]
        write_audio(folder / setup["sources"][name], exact_sum(members) if members else silent, rate, "WAV")
    write_audio(folder / setup["mixture"], exact_sum(integers), rate, "WAV")
    return folder


def write_slakh(root, song, stems, integers, rate, window_quarters):
    """The Slakh track folder: mono stems, their sum as mix.flac, each stem's MIDI and metadata.yaml."""
    folder = root / "slakh" / song.split / song.track_name
    mono = [to_mono(values) for values in integers]
    start, end = window_quarters
    entries = {}
    for index, (stem, values) in enumerate(zip(stems, mono)):
        name = f"S{index:02d}"
        write_audio(folder / "stems" / f"{name}.flac", values, rate, "FLAC")
        midi = midi_bytes(window_notes(stem.notes, start, end), stem.program, song.piece.tempo, stem.channel, stem.pan)
        atomic_write(folder / "MIDI" / f"{name}.mid", lambda stream, data=midi: stream.write(data), binary=True)
        entries[name] = {"audio_rendered": True, "inst_class": stem.inst_class, "is_drum": stem.is_drum,
                         "midi_program_name": stem.program_name, "midi_saved": True, "plugin_name": PLUGIN_NAME,
                         "program_num": stem.program, "musdb_stem": stem.musdb}
    write_audio(folder / "mix.flac", exact_sum(mono), rate, "FLAC")
    piece = song.piece
    metadata = {
        "UUID": str(uuid.uuid5(UUID_NAMESPACE, f"{piece.path}#{song.window}")),
        "audio_dir": "stems", "midi_dir": "MIDI", "normalized": True,
        "demo_source": {"corpus_path": piece.path, "composer": piece.composer, "work": piece.work,
                        "copyright": piece.copyright, "window": song.window, "tempo_qpm": round(piece.tempo, 3),
                        "harmonised": piece.harmonised, "musdb_name": song.musdb_name},
        "stems": entries,
    }
    atomic_write_text(folder / "metadata.yaml", yaml.safe_dump(metadata, sort_keys=True))
    return folder
