"""A band arrangement for a one-line fiddle tune: a chord per bar, then a bass, a strummed and a held part.

A separation set needs several pitched sources per song, and a fiddle tune has one. Each bar gets the
diatonic triad that covers most of its melody (weighted by duration, the downbeat counted double, with a
small preference for tonic, dominant and subdominant, and the previous bar's chord kept on an empty bar).
The triads come from the key music21 estimates for the tune. No randomness: the same tune always gets the
same chords.
"""
import math

MAJOR = (0, 2, 4, 5, 7, 9, 11)
HARMONIC_MINOR = (0, 2, 3, 5, 7, 8, 11)  # the raised seventh gives minor tunes a major dominant
# scale degree (0 = tonic) -> preference added to the melody's coverage, in quarter notes
DEGREE_PRIOR = {0: 0.30, 4: 0.20, 3: 0.15, 5: 0.05, 1: 0.0, 2: 0.0}


def triads(tonic, mode):
    """[(degree, root pitch class, {pitch classes})] of the diatonic triads a folk tune is harmonised with."""
    scale = HARMONIC_MINOR if mode == "minor" else MAJOR
    out = []
    for degree in DEGREE_PRIOR:
        pcs = [(tonic + scale[(degree + step) % 7]) % 12 for step in (0, 2, 4)]
        out.append((degree, pcs[0], set(pcs)))
    return out


def bar_chords(melody, tonic, mode, bar, phase, length):
    """One (root, pitch classes) per bar from ``phase - bar`` (the anacrusis) to the end."""
    candidates = triads(tonic, mode)
    starts = [phase - bar + k * bar for k in range(math.ceil((length - phase) / bar) + 1)]
    chords, previous = [], candidates[0]
    for start in starts:
        end = start + bar
        weight = [0.0] * 12
        for onset, duration, pitch in melody:
            overlap = min(end, onset + duration) - max(start, onset)
            if overlap > 0:
                weight[pitch % 12] += overlap * (2.0 if abs(onset - start) < 1e-6 else 1.0)
        if sum(weight) == 0:
            chosen = previous
        else:
            chosen = max(candidates, key=lambda c: (sum(weight[pc] for pc in c[2]) + DEGREE_PRIOR[c[0]], -c[0]))
        chords.append((start, chosen))
        previous = chosen
    return chords


def voiced(pitch_class, low):
    """The pitch of ``pitch_class`` in the octave from MIDI ``low`` up."""
    return low + (pitch_class - low) % 12


def harmonise(melody, tonic, mode, bar, beat, phase, length):
    """[melody, strummed chords, held chords, bass] as (onset, duration, pitch) lists, cut at ``length``."""
    strum, held, bass = [], [], []
    for start, (_, root, pcs) in bar_chords(melody, tonic, mode, bar, phase, length):
        begin, end = max(start, 0.0), min(start + bar, length)
        if end <= begin:
            continue
        held.extend((begin, end - begin, voiced(pc, 55)) for pc in sorted(pcs))
        beats = [begin + k * beat for k in range(int(math.ceil((end - begin) / beat - 1e-9)))]
        for index, onset in enumerate(beats):
            duration = min(beat * 0.8, end - onset)
            strum.extend((onset, duration, voiced(pc, 52)) for pc in sorted(pcs))
            # Root on the strong beats, the fifth on the others: the usual two-beat folk bass.
            fifth = (root + 7) % 12
            bass.append((onset, min(beat * 0.9, end - onset), voiced(root if index % 2 == 0 else fifth, 36)))
    melody = [(onset, min(duration, length - onset), pitch) for onset, duration, pitch in melody if onset < length]
    return [sorted(melody), sorted(strum), sorted(held), sorted(bass)]
