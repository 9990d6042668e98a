"""`avgn-fast profile` and the profile library on CPU: rows, per-stage times, ratios, CSV, real decoded data."""

import csv
import math

import pytest
import torch
from media import write_video

from avgn_fast.cli import main as cli_main
from avgn_fast.config import AVGNConfig
from avgn_fast.engine.profile import STAGES, ProfileRow, append_csv, format_table, profile, write_plot
from avgn_fast.models.avgn import AVGN

TINY = AVGNConfig.from_name("tiny")


pytestmark = pytest.mark.usefixtures("one_thread")  # small shapes: see conftest



@pytest.fixture(scope="module")
def rows():
    torch.manual_seed(0)
    return profile(AVGN(TINY).eval(), batch_sizes=(1, 2), iters=2, warmup=1, compare=True, device="cpu")


def test_profile_measures_every_configuration_and_the_dense_baseline(rows):
    assert [(r.model, r.backend, r.precision, r.batch) for r in rows] == [
        ("avgn", "eager", "fp32", 1), ("dense", "eager", "fp32", 1),
        ("avgn", "eager", "fp32", 2), ("dense", "eager", "fp32", 2)]
    avgn = AVGN(TINY)
    cost = avgn.cost()
    for r in rows:
        assert r.device.startswith("cpu") and r.torch == torch.__version__ and r.date
        assert r.videos_per_s > 0 and 0 < r.latency_p50_ms <= r.latency_p90_ms and r.warmup_s > 0
        assert math.isnan(r.decode_ms) and math.isnan(r.peak_mem_mib)  # random clips, no GPU
        assert r.local_ms > 0 and r.crop_ms > 0 and r.head_ms > 0
        # stages are timed in a separate, synchronized pass: together they fit in a batch's time, roughly
        assert sum(getattr(r, f"{s}_ms") for s in STAGES[1:]) < 5 * r.latency_p90_ms
        assert r.tflops == pytest.approx(2 * r.gflops_per_video * r.videos_per_s / 1e3)
    avgn_rows = [r for r in rows if r.model == "avgn"]
    assert all(r.glance_ms > 0 and r.aespa_ms > 0 and r.config == "tiny" for r in avgn_rows)
    assert all(r.gflops_per_video == pytest.approx(cost.per_video + TINY.k * cost.per_step) for r in avgn_rows)
    dense = [r for r in rows if r.model == "dense"]
    dense_cost = AVGN(TINY.replace(dense=True, audio=False)).cost()
    assert all(r.gflops_per_video == pytest.approx(dense_cost.per_video + TINY.num_frames * dense_cost.per_step)
               for r in dense)
    table = format_table(rows, compare=True)
    assert "x dense" in table and len(table.splitlines()) == 2 + len(rows)
    ratio = rows[0].videos_per_s / rows[1].videos_per_s
    assert f"{ratio:.2f}" in table.splitlines()[2]


def test_csv_is_appended_with_one_header_and_refuses_a_foreign_file(rows, tmp_path):
    path = tmp_path / "profile.csv"
    append_csv(path, rows[:2])
    append_csv(path, rows[2:])
    with path.open(newline="") as f:
        read = list(csv.DictReader(f))
    assert len(read) == len(rows)
    assert [float(r["videos_per_s"]) for r in read] == pytest.approx([r.videos_per_s for r in rows])
    assert read[0]["device"] == rows[0].device and read[0]["backend"] == "eager"
    foreign = tmp_path / "other.csv"
    foreign.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="header is not a profile's"):
        append_csv(foreign, rows)


def test_stage_chart_stacks_the_measured_stages_of_every_row(rows, tmp_path):
    fig = write_plot(rows, tmp_path / "stages.png")
    assert (tmp_path / "stages.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (ax,) = fig.axes
    measured = [s for s in STAGES if not all(math.isnan(getattr(r, f"{s}_ms")) for r in rows)]
    assert "decode" not in measured and ax.get_legend_handles_labels()[1] == measured
    bars = [patch for patch in ax.patches]
    assert len(bars) == len(measured) * len(rows)
    for j, stage in enumerate(measured):  # bar i of stage j: row i's stage time, starting where row i's last ended
        for i, r in enumerate(rows):
            bar = bars[j * len(rows) + i]
            want = getattr(r, f"{stage}_ms")
            assert bar.get_width() == pytest.approx(0.0 if math.isnan(want) else want)
            done = sum(0.0 if math.isnan(getattr(r, f"{s}_ms")) else getattr(r, f"{s}_ms") for s in measured[:j])
            assert bar.get_x() == pytest.approx(done)
    at = {round(t.get_position()[1]): t.get_text() for t in ax.get_yticklabels()}  # first row on top
    assert [at[len(rows) - 1 - i] for i in range(len(rows))] == [
        f"{r.model} {r.backend} {r.precision} b{r.batch}" for r in rows]
    assert all(bars[i].get_y() + bars[i].get_height() / 2 == pytest.approx(len(rows) - 1 - i) for i in range(len(rows)))
    with pytest.raises(ValueError, match="no profile rows"):
        write_plot([], tmp_path / "empty.png")


def test_profile_row_validates(rows):
    fields = {**rows[0].__dict__, "latency_p50_ms": 5.0, "latency_p90_ms": 1.0}
    with pytest.raises(ValueError, match="implausible"):
        ProfileRow(**fields)


def test_cli_profile_on_decoded_videos(tmp_path, capsys):
    data = tmp_path / "videos"
    data.mkdir()
    for i in range(2):
        write_video(data / f"v{i}.mp4", size=(96, 128), fps=8, seconds=1.0, seed=i)
    out = tmp_path / "p.csv"
    code = cli_main(["profile", "--config", "tiny", "--set", "k=2", "--batch-size", "3", "--data", str(data),
                     "--csv", str(out), "--iters", "1", "--warmup", "1", "--device", "cpu", "--precision", "fp32",
                     "--plot", str(tmp_path / "stages.png")])
    assert code == 0 and (tmp_path / "stages.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "videos/s" in printed and "config tiny" in printed
    with out.open(newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["batch"] == "3" and float(row["decode_ms"]) > 0 and row["precision"] == "fp32"
    assert cli_main(["profile", "--config", "tiny", "--backend", "tensorrt", "--device", "cpu"]) == 2
