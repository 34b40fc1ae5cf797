"""A Standard MIDI File (format 0) for one instrument, written from note tuples.

FluidSynth renders a file per stem, so a stem's file holds one channel: its program (or drum kit), pan and
notes. Writing the bytes ourselves keeps them independent of music21's MIDI exporter, whose choices
(channels, tempo maps, instrument guesses from part names) would otherwise decide what a stem sounds like.
"""
from dataclasses import dataclass

TICKS_PER_QUARTER = 960
DRUM_CHANNEL = 9  # General MIDI's channel 10, counted from 0


@dataclass(frozen=True)
class Note:
    """A note in quarter notes from the start: ``onset`` and ``duration`` (> 0), MIDI ``pitch`` and ``velocity``."""
    onset: float
    duration: float
    pitch: int
    velocity: int


def variable_length(value):
    """MIDI's variable-length quantity: 7 bits per byte, high bit set on all but the last."""
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def ticks(quarters):
    return int(round(quarters * TICKS_PER_QUARTER))


def track_events(notes, program, channel, pan, tempo_qpm):
    """(tick, order, bytes) events; at one tick note-offs sort before note-ons, so a repeated pitch re-sounds."""
    tempo = int(round(60_000_000 / tempo_qpm))
    events = [(0, 0, b"\xff\x51\x03" + tempo.to_bytes(3, "big")),
              (0, 1, bytes([0xC0 | channel, program])),
              (0, 2, bytes([0xB0 | channel, 10, pan]))]
    for note in notes:
        start, end = ticks(note.onset), ticks(note.onset + note.duration)
        if end <= start:
            end = start + 1
        events.append((start, 4, bytes([0x90 | channel, note.pitch, note.velocity])))
        events.append((end, 3, bytes([0x80 | channel, note.pitch, 0])))
    return sorted(events, key=lambda event: (event[0], event[1], event[2]))


def midi_bytes(notes, program, tempo_qpm, channel=0, pan=64):
    """The file's bytes: a header and one track (tempo, program change, pan, the notes, end of track)."""
    for note in notes:
        if not (0 <= note.pitch <= 127 and 1 <= note.velocity <= 127):
            raise ValueError(f"note out of MIDI range: {note}")
    body, now = bytearray(), 0
    for tick, _, data in track_events(notes, program, channel, pan, tempo_qpm):
        body += variable_length(tick - now) + data
        now = tick
    body += variable_length(0) + b"\xff\x2f\x00"
    header = b"MThd" + (6).to_bytes(4, "big") + (0).to_bytes(2, "big") + (1).to_bytes(2, "big") \
        + TICKS_PER_QUARTER.to_bytes(2, "big")
    return header + b"MTrk" + len(body).to_bytes(4, "big") + bytes(body)
