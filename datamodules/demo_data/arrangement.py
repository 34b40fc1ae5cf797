"""Who plays what: each voice of a piece gets a Slakh instrument class and a General MIDI program, and a
seeded drum part is added, so every song has the drums, bass, guitar and piano that Slakh's default
experiment asks for.

The lowest voice is the bass (moved down an octave while it sits above a bass's register). Guitar and piano
take two other voices; with four or more voices the top one, the tune, goes to a lead instrument (strings,
brass or a reed), and any further inner voice to one of those too. In the MUSDB18 layout the top voice is
``vocals``, the bass ``bass``, the drums ``drums`` and every other voice ``other``.
"""
from dataclasses import dataclass

import numpy as np

from datamodules.demo_data.midi_file import DRUM_CHANNEL, Note

# Slakh's inst_class -> [(General MIDI program, its name)]; the names are GM's own.
PROGRAMS = {
    "Bass": [(32, "Acoustic Bass"), (33, "Electric Bass (finger)"), (34, "Electric Bass (pick)"),
             (35, "Fretless Bass")],
    "Guitar": [(24, "Acoustic Guitar (nylon)"), (25, "Acoustic Guitar (steel)"), (26, "Electric Guitar (jazz)"),
               (27, "Electric Guitar (clean)")],
    "Piano": [(0, "Acoustic Grand Piano"), (1, "Bright Acoustic Piano"), (2, "Electric Grand Piano"),
              (4, "Electric Piano 1"), (5, "Electric Piano 2")],
    "Strings": [(40, "Violin"), (41, "Viola"), (42, "Cello")],
    "Brass": [(56, "Trumpet"), (57, "Trombone"), (60, "French Horn"), (61, "Brass Section")],
    "Reed": [(64, "Soprano Sax"), (65, "Alto Sax"), (66, "Tenor Sax"), (68, "Oboe"), (71, "Clarinet")],
}
LEAD_CLASSES = ("Strings", "Brass", "Reed")
# General MIDI drum kits (bank 128 programs) that FluidR3_GM has.
DRUM_KITS = [(0, "Standard Kit"), (8, "Room Kit"), (16, "Power Kit"), (24, "Electronic Kit"), (25, "TR-808 Kit"),
             (32, "Jazz Kit"), (40, "Brush Kit")]
KICK, SNARE, CLOSED_HAT, RIDE, CRASH = 36, 38, 42, 51, 49
BASS_CEILING = 52  # a bass line whose median is above E3 is moved down an octave


@dataclass
class Stem:
    """One rendered stem: Slakh's ``inst_class``, the program, the musdb stem it is summed into, its notes."""
    inst_class: str
    program: int
    program_name: str
    musdb: str
    notes: list
    is_drum: bool = False
    pan: int = 64

    @property
    def channel(self):
        return DRUM_CHANNEL if self.is_drum else 0


def voice_classes(n_voices, rng):
    """Slakh classes for voices ordered top to bottom: the bottom one Bass, guitar and piano always present."""
    if n_voices < 3:
        raise ValueError(f"a demo song needs at least 3 voices, got {n_voices}")
    middle = ["Guitar", "Piano"]
    rng.shuffle(middle)
    extra = n_voices - 3
    leads = [LEAD_CLASSES[int(i)] for i in rng.integers(0, len(LEAD_CLASSES), size=extra)]
    if extra:  # the tune goes to a lead instrument, guitar and piano accompany below it
        return [leads[0]] + middle + leads[1:] + ["Bass"]
    return middle + ["Bass"]


def pick_program(inst_class, median_pitch, rng):
    choices = PROGRAMS[inst_class]
    if inst_class == "Strings":  # violin, viola or cello by register, not by chance
        return choices[0] if median_pitch >= 67 else choices[1] if median_pitch >= 55 else choices[2]
    return choices[int(rng.integers(0, len(choices)))]


def humanised(line, base_velocity, bar, phase, rng, transpose=0):
    """Notes with a seeded velocity: the voice's level, a little jitter, a push on each downbeat."""
    jitter = rng.integers(-6, 7, size=len(line))
    notes = []
    for (onset, duration, pitch), wobble in zip(line, jitter):
        downbeat = abs(((onset - phase) / bar) - round((onset - phase) / bar)) < 1e-6
        velocity = int(np.clip(base_velocity + wobble + (8 if downbeat else 0), 1, 127))
        pitch = int(np.clip(pitch + transpose, 0, 127))
        notes.append(Note(onset, duration, pitch, velocity))
    return notes


def bass_transpose(line):
    median = float(np.median([pitch for _, _, pitch in line]))
    shift = 0
    while median + shift > BASS_CEILING and min(p for _, _, p in line) + shift - 12 >= 24:
        shift -= 12
    return shift


def pitched_stems(piece, rng):
    classes = voice_classes(len(piece.lines), rng)
    stems = []
    for index, (line, inst_class) in enumerate(zip(piece.lines, classes)):
        median = float(np.median([pitch for _, _, pitch in line]))
        program, name = pick_program(inst_class, median, rng)
        transpose = bass_transpose(line) if inst_class == "Bass" else 0
        musdb = "bass" if inst_class == "Bass" else "vocals" if index == 0 else "other"
        pan = 64 if inst_class == "Bass" else int(rng.integers(24, 105))
        notes = humanised(line, int(rng.integers(72, 97)), piece.bar, piece.phase, rng, transpose)
        stems.append(Stem(inst_class, program, name, musdb, notes, pan=pan))
    return stems


def subdivisions(bar, beat):
    """(beats per bar, hits per beat): two per beat in simple meters, three in compound ones."""
    beats = max(1, int(round(bar / beat)))
    per_beat = 3 if abs(beat - 1.5) < 1e-6 or abs(beat - 3.0) < 1e-6 else 2
    return beats, per_beat


def drum_bar(beats, per_beat, ride, extra_kicks):
    """[(position in subdivisions, drum note, base velocity)] of the groove's ordinary bar."""
    hits = []
    for beat in range(beats):
        strong = beat == 0 or (beats == 4 and beat == 2)
        if strong:
            hits.append((beat * per_beat, KICK, 100))
        elif beats >= 2:
            hits.append((beat * per_beat, SNARE, 92 if beats != 3 else 70))
        for sub in range(per_beat):
            hits.append((beat * per_beat + sub, RIDE if ride else CLOSED_HAT, 78 if sub == 0 else 60))
    hits.extend((position, KICK, 80) for position in extra_kicks)
    return hits


def drum_stem(piece, span, rng):
    """A seeded groove over ``span`` quarter notes: the kit, the cymbal, the extra kick drums and the fills
    are drawn once per piece; velocities vary per hit. A crash every eight bars, a snare fill before it."""
    program, name = DRUM_KITS[int(rng.integers(0, len(DRUM_KITS)))]
    beats, per_beat = subdivisions(piece.bar, piece.beat)
    step = piece.beat / per_beat
    ride = bool(rng.random() < 0.3)
    offbeats = [p for p in range(beats * per_beat) if p % per_beat]
    extra_kicks = [p for p in offbeats if rng.random() < 0.15]
    groove = drum_bar(beats, per_beat, ride, extra_kicks)
    notes, bar_index = [], 0
    start = piece.phase - piece.bar if piece.phase > 0 else 0.0
    while start < span:
        hits = list(groove)
        if bar_index % 8 == 0:
            hits.append((0, CRASH, 96))
        if bar_index % 8 == 7:  # a fill on the last beat
            last = (beats - 1) * per_beat
            hits = [h for h in hits if h[0] < last] + [(last + s, SNARE, 70 + 8 * s) for s in range(per_beat)]
        for position, drum, velocity in hits:
            onset = start + position * step
            if 0 <= onset < span:
                level = int(np.clip(velocity + rng.integers(-8, 9), 1, 127))
                notes.append(Note(onset, min(step, 0.25), drum, level))
        start += piece.bar
        bar_index += 1
    return Stem("Drums", program, name, "drums", sorted(notes, key=lambda n: (n.onset, n.pitch)), is_drum=True)


def arrange(piece, span, rng):
    """Every stem of a piece over ``span`` quarter notes (the piece repeated as often as that needs): the
    pitched voices top to bottom, then the drums."""
    stems = pitched_stems(piece, rng)
    plays = int(np.ceil(span / piece.length - 1e-9))
    for stem in stems:
        stem.notes = [Note(n.onset + k * piece.length, n.duration, n.pitch, n.velocity)
                      for k in range(plays) for n in stem.notes if n.onset + k * piece.length < span]
    return stems + [drum_stem(piece, span, rng)]
