"""The README written beside the demo data: what it is, how it was made, and the licences of its sources."""

FLUID_MIT = """Copyright (c) 2000-2002, 2008 Frank Wen; Copyright (c) 2008 Toby Smithe

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction, including
without limitation the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is furnished to do so, subject to the
following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial
portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT
LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO
EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER
IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE
USE OR OTHER DEALINGS IN THE SOFTWARE."""


def piece_rows(songs):
    """One Markdown table row per piece used: where it comes from and the notice its encoding carries."""
    seen, rows = {}, []
    for song in songs:
        entry = seen.setdefault(song.piece.path, [song.piece, song.split, []])
        entry[2].append(song.number)
    for path, (piece, split, numbers) in sorted(seen.items()):
        notice = piece.copyright or "none in the file"
        who = piece.composer or "not named in the file"
        rows.append(f"| `{path}` | {split} | {', '.join(str(n) for n in numbers)} | {who} | {notice} |")
    return rows


def readme_text(request, songs, renderer, music21_version):
    counts = {split: sum(song.split == split for song in songs) for split in ("train", "validation", "test")}
    folk = sum(1 for song in songs if song.piece.harmonised)
    lines = [
        "# Demo multitrack set (rendered from public-domain scores)",
        "",
        "Made by `make demo-data` (`python -m experiments.demo_data`). Nothing here is a recording: every part",
        "of a score from music21's corpus was rendered alone by FluidSynth with the FluidR3_GM soundfont, a",
        "seeded drum part was added, each stem was brought to one loudness (RMS over its sounding 50 ms blocks),",
        "and every mixture is the exact sum of its stored 16-bit stems.",
        "",
        f"Request: {request}. Renderer: {renderer}; music21 {music21_version}.",
        f"Songs: {counts['train']} train, {counts['validation']} validation, {counts['test']} test; "
        f"{folk} of them are fiddle tunes given a bass and chords by `datamodules/demo_data/folk.py`.",
        "",
        "## Layouts",
        "",
        "* `musdb/{train,test}/Demo NNN - <piece> <k>/{mixture,drums,bass,other,vocals}.wav` (MUSDB18-HQ:",
        "  44.1 kHz stereo). drums = the drum part, bass = the lowest voice, vocals = the top voice, other = the",
        "  rest. The validation songs are in `train/` and carry the highest numbers: `datamodules/musdb18.py`,",
        "  finding none of musdb's own validation names, holds out the last tenth of `train/` by sorted name,",
        "  and the split sizes are chosen so that this tenth is exactly the validation songs.",
        "* `slakh/{train,validation,test}/TrackNNNNN/{mix.flac,stems/Sxx.flac,MIDI/Sxx.mid,metadata.yaml}`",
        "  (Slakh2100: 44.1 kHz mono; `inst_class` Drums, Bass, Guitar, Piano and Strings/Brass/Reed).",
        "  Track NNNNN and musdb's Demo NNN are the same song.",
        "",
        "Songs from one piece are consecutive windows of it and are always in the same split.",
        "",
        "## Licences",
        "",
        "**Scores.** The music comes from the corpus shipped inside the `music21` package (the package is BSD-3-",
        "Clause; the corpus is not covered by that licence). music21's `corpus/license.txt` says that to the",
        "best of its authors' knowledge each piece is out of copyright in the United States or licensed for",
        "use, that the encodings are distributed with their encoders' permission, that some may carry",
        "restrictions on commercial use, and it points to the licences embedded in individual files. The",
        "compositions used here are all centuries old (Haydn, Mozart, Beethoven string quartets; Palestrina,",
        "Monteverdi, Lusitano and fourteenth-century polyphony; Corelli, Handel; tunes from Ryan's Mammoth",
        "Collection, 1883). Left out on purpose: the Bach chorales (reserved as an independent held-out",
        "check), the Essen folksongs (non-commercial use only) and the `luca`/`ciconia` encodings",
        "(CC-BY-SA). The notice each used file carries is listed below; where it names a licence (for",
        "example CC-BY for the Corelli encoding), credit the encoder as it asks.",
        "",
        "**Soundfont.** FluidR3_GM.sf2 by Frank Wen, from Debian's `fluid-soundfont-gm` package, released under",
        "the MIT licence (Debian's `/usr/share/doc/fluid-soundfont-gm/copyright`):",
        "",
        "```",
        FLUID_MIT,
        "```",
        "",
        "**Renderer.** FluidSynth (LGPL-2.1) was run as a program; none of it is in these files.",
        "",
        "## Pieces used",
        "",
        "| corpus path | split | songs | composer (as encoded) | notice in the file |",
        "|---|---|---|---|---|",
        *piece_rows(songs),
        "",
    ]
    return "\n".join(lines)
