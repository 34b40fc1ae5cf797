"""``make demo-data``: a small multitrack set of real instrument audio, rendered offline and byte for byte
reproducibly from public-domain scores in music21's corpus, written in the MUSDB18-HQ and Slakh2100 layouts.

One module per step: ``catalogue`` (which scores, read into note lists; never the Bach chorales), ``folk``
(a bass and chords for one-line fiddle tunes), ``arrangement`` (Slakh instrument classes, General MIDI
programs, a seeded drum part), ``midi_file`` (the MIDI bytes of one stem), ``fluidsynth`` (rendering),
``mixing`` (loudness, 16-bit integers, exact sums), ``layouts`` (the two folder layouts), ``licences``
(the README beside the data) and ``build`` (splits, the marker files, the whole run).
"""
