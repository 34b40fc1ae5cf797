"""The data-loading bench runs end to end on a tiny synthetic dataset and reports what it measured."""
import json

from experiments.bench.data import main


def test_bench_data_reports_decode_and_epoch_speed(tmp_path):
    output = tmp_path / "bench_data.json"
    code = main([f"output={output}", f"workdir={tmp_path / 'work'}", "layouts=hq", "tracks=2", "seconds=2",
                 "crop_length=1024", "frames_per_song=8", "workers=0"])
    assert code == 0
    (result,) = json.loads(output.read_text())["results"]
    assert result["decode"]["songs"] == 2 and result["decode"]["audio_seconds"] == 4.0
    assert [e["page_cache"] for e in result["epoch_of_random_frames"]] == ["warm", "dropped"]
    assert all(e["frames"] == 16 and e["x_real_time"] > 0 for e in result["epoch_of_random_frames"])
    assert main([f"output={output}", "colour=blue"]) == 2  # an unknown option is refused
