"""make demo-data on one 3-second song: it loads through the real musdb18 and Slakh2100 datamodules, every
mixture is exactly the sum of its stored stems, a rebuild gives the same bytes, a rerun skips, and a foreign
folder is refused. Needs the fluidsynth program and the FluidR3_GM soundfont (make install puts them in when
run as root, as CI does); skipped without them."""
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile
import yaml

from datamodules.demo_data import catalogue
from datamodules.demo_data.build import MARKER, DemoDataError, build_demo_data, plan_songs, split_sizes
from datamodules.demo_data.fluidsynth import RendererMissing, find_renderer
from datamodules.musdb18 import MusdbDataModule, own_validation_names
from datamodules.slakh2100 import SlakhDataModule
from experiments.demo_data import main

REPO = Path(__file__).resolve().parents[1]
SECONDS = 3.0
# A short three-voice piece, so the test renders little and parses fast.
PIECE = "corelli/opus3no1/1grave.xml"


def renderer_or_skip():
    try:
        find_renderer()
    except RendererMissing as error:
        pytest.skip(f"demo-data needs FluidSynth and its soundfont: {error}")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    renderer_or_skip()
    root = tmp_path_factory.mktemp("demo") / "demo"
    build_demo_data(root, songs=1, seconds=SECONDS, seed=0, jobs=1, paths=[PIECE], log=lambda message: None)
    return root


def tree_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def options(cache, rate):
    return dict(sample_rate=rate, crop_length=1024, eval_length=2048, batch_size=2, eval_batch_size=2,
                frames_per_song=5, cache_dir=str(cache))


def test_both_layouts_load_through_the_datamodules(built, tmp_path):
    musdb = MusdbDataModule(root=str(built / "musdb"), sources=["drums", "bass", "other", "vocals"],
                            **options(tmp_path / "musdb_cache", 16000))
    songs, names = musdb.load_songs("test")
    assert len(names) == 1 and names[0].startswith("Demo 001 - corelli")
    song = np.asarray(songs.array(0))
    assert song.shape == (4, int(SECONDS * 16000)) and np.isfinite(song).all()
    assert (np.sqrt((song ** 2).mean(axis=1)) > 1e-3).all()  # every source sounds

    slakh = SlakhDataModule(root=str(built / "slakh"), sources=["drums", "bass", "guitar", "piano"],
                            **options(tmp_path / "slakh_cache", 22050))
    songs, names = slakh.load_songs("test")
    assert names == ["Track00001"]
    assert np.asarray(songs.array(0)).shape == (4, int(SECONDS * 22050))
    metadata = yaml.safe_load((built / "slakh" / "test" / "Track00001" / "metadata.yaml").read_text())
    stems = metadata["stems"]
    assert {s["inst_class"] for s in stems.values()} >= {"Drums", "Bass", "Guitar", "Piano"}
    assert [s["is_drum"] for s in stems.values()].count(True) == 1
    assert all(s["audio_rendered"] and isinstance(s["program_num"], int) for s in stems.values())
    assert metadata["demo_source"]["corpus_path"] == PIECE


def test_mixtures_are_exactly_the_sum_of_the_stored_stems(built):
    folder = next((built / "musdb" / "test").iterdir())
    decoded = {p.stem: soundfile.read(p, dtype="float32") for p in folder.glob("*.wav")}
    assert all(rate == 44100 and audio.shape == (int(SECONDS * 44100), 2) for audio, rate in decoded.values())
    total = sum(decoded[name][0] for name in ("drums", "bass", "other", "vocals"))
    assert np.array_equal(total, decoded["mixture"][0])
    assert 0.1 < np.abs(total).max() < 1.0  # loud enough, and nothing clipped

    track = built / "slakh" / "test" / "Track00001"
    stems = [soundfile.read(p, dtype="float64")[0] for p in sorted((track / "stems").glob("S*.flac"))]
    mix, rate = soundfile.read(track / "mix.flac", dtype="float64")
    assert rate == 44100 and mix.ndim == 1 and np.array_equal(sum(stems), mix)


def test_a_rebuild_gives_the_same_bytes_and_a_rerun_skips(built, tmp_path):
    again = tmp_path / "again"
    build_demo_data(again, songs=1, seconds=SECONDS, seed=0, jobs=1, paths=[PIECE], log=lambda message: None)
    assert tree_bytes(again) == tree_bytes(built)
    marker = json.loads((again / MARKER).read_text())
    assert set(marker["files"]) == set(tree_bytes(again)) - {MARKER}

    said = []
    stamp = (again / MARKER).stat().st_mtime_ns
    build_demo_data(again, songs=1, seconds=SECONDS, seed=0, jobs=1, paths=[PIECE], log=said.append)
    assert "nothing to do" in said[0] and (again / MARKER).stat().st_mtime_ns == stamp


def test_a_foreign_or_unusable_folder_is_refused(tmp_path, capsys):
    renderer_or_skip()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main([f"root={foreign}", "songs=1", "seconds=1"]) == 2
    assert "refusing" in capsys.readouterr().err and (foreign / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main([f"root={a_file}", "songs=1", "seconds=1"]) == 2 and "is a file" in capsys.readouterr().err
    assert main([f"root={tmp_path / 'x'}", "songs=2"]) == 2 and "at least 3" in capsys.readouterr().err
    assert main([f"root={tmp_path / 'x'}", "bogus=1"]) == 2 and "unknown option" in capsys.readouterr().err


def test_the_renderer_missing_names_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no fluidsynth on it
    assert main([f"root={tmp_path / 'demo'}", "songs=1"]) == 2
    assert "apt-get install" in capsys.readouterr().err and not (tmp_path / "demo").exists()


@pytest.mark.parametrize("songs", [3, 10, 48, 100, 333])
def test_musdb_holds_out_exactly_the_validation_songs(songs):
    sizes = split_sizes(songs)
    assert sum(sizes.values()) == songs and min(sizes.values()) >= 1
    names = [f"Demo {n:03d} - x" for n in range(1, sizes["train"] + sizes["validation"] + 1)]
    assert own_validation_names(names) == names[sizes["train"]:]


def test_the_bach_chorales_are_never_candidates():
    order = catalogue.candidate_order(seed=0)
    assert order and not [path for _, path in order if path.split("/")[0] in catalogue.RESERVED]
    assert {group for group, _ in order} == set(catalogue.GROUPS)
    with pytest.raises(DemoDataError, match="reserved"):
        plan_songs(1, SECONDS, 0, paths=["bach/bwv66.6.mxl"])


def test_pieces_never_straddle_splits():
    # Planning only (no rendering): 7 songs of 20 s from the default catalogue order.
    plan = plan_songs(7, 20.0, 0)
    split_of = {}
    for song in plan:
        assert split_of.setdefault(song.piece.path, song.split) == song.split
    assert [s.number for s in plan] == list(range(1, 8))
    assert [s.split for s in plan] == sorted((s.split for s in plan), key=("train", "validation", "test").index)


def test_make_passes_the_folder_and_options_as_single_arguments(tmp_path):
    renderer_or_skip()  # else the recipe would try to install FluidSynth first
    recorder = tmp_path / "venv" / "bin" / "python"  # stands in for the venv's python: prints its arguments
    recorder.parent.mkdir(parents=True)
    recorder.write_text("#!/usr/bin/env python3\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    recorder.chmod(0o755)
    weird = str(tmp_path / "my demo; touch INJECTED; 'it\"s'")
    command = ["make", "-s", "-C", str(REPO), f"VENV={tmp_path / 'venv'}", f"DEMO_ROOT={weird}",
               "SONGS=5;touch INJECTED", "ARGS=seconds=2 jobs=1", "demo-data"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["-m", "experiments.demo_data", f"root={weird}", "songs=5;touch INJECTED",
                                       "seconds=2", "jobs=1"]
    assert not list(tmp_path.rglob("INJECTED"))
