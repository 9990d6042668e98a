"""Pareto harness: the frontier and threshold calibration on hand-made inputs, and a real sweep end to end."""

import csv
import json

import matplotlib.image
import pytest
import torch

from avgn_fast import pareto
from avgn_fast.checkpoint import load_checkpoint
from avgn_fast.cli import main as cli_main
from avgn_fast.config import AVGNConfig
from avgn_fast.data.folder import FolderDataset
from avgn_fast.data.synth import write_dataset
from avgn_fast.models.avgn import AVGN
from avgn_fast.training import FolderSource, evaluate

# AVSynth's smallest layout (8 frames, K=2) keeps the end-to-end sweep fast
SMALL = AVGNConfig.from_name("tiny", num_frames=8, k=2)
RUNS = {"avgn": [], "uniform": ["temporal=uniform", "spatial=center", "audio=false"], "dense": ["dense=true"]}


pytestmark = pytest.mark.usefixtures("one_thread")  # small shapes: see conftest


def test_frontier_on_hand_made_points():
    points = [
        (1.0, 0.50),  # 0: on (cheapest with 0.5)
        (2.0, 0.70),  # 1: on
        (2.0, 0.60),  # 2: off, same cost as 1 and less accurate
        (3.0, 0.70),  # 3: off, same accuracy as 1 and dearer
        (0.5, 0.20),  # 4: on, cheapest of all
        (4.0, 0.90),  # 5: on, most accurate
        (1.5, 0.45),  # 6: off, dominated by 0
        (4.0, 0.90),  # 7: on, an exact tie with 5 dominates neither
    ]
    assert pareto.pareto_frontier(points) == [True, True, False, False, True, True, False, True]
    assert pareto.pareto_frontier([]) == []
    assert pareto.pareto_frontier([(3.0, 0.1)]) == [True]


def _exit_steps_by_hand(probs, threshold):
    steps = []
    for video in probs:
        top = video.amax(-1).tolist()
        steps.append(next((j + 1 for j, c in enumerate(top) if c >= threshold), len(top)))
    return torch.tensor(steps)


def test_calibrated_thresholds_spread_the_exits():
    torch.manual_seed(0)
    probs = torch.randn(200, 4, 5).mul(2).softmax(-1)
    taus = pareto.calibrate_thresholds(probs, 3)
    assert len(taus) == 3 and taus == sorted(set(taus))
    means = [float(_exit_steps_by_hand(probs, t).float().mean()) for t in taus]
    for tau in taus:
        assert torch.equal(pareto.exit_steps_taken(probs, tau), _exit_steps_by_hand(probs, tau))
    assert all(1 < m < 4 for m in means) and means == sorted(means)
    # evenly spread targets 1.75, 2.5, 3.25: each chosen mean lands near its own
    assert means[0] < 2.2 < means[1] < 2.9 < means[2]
    assert pareto.calibrate_thresholds(probs[:, :1], 3) == []  # one step: nothing to exit early from


def test_plan_and_method_names():
    tiny = AVGNConfig.from_name("tiny").replace(patch_size=32, glance_size=32, k=4)  # T=16
    knobs = pareto.plan(tiny, ks=(1, 2, 4, 8, 16), thresholds=[0.5, 0.9], patch_sizes=[24, tiny.patch_size],
                        glance_sizes=[16])
    assert [(k.k, k.exit_threshold, k.patch_size, k.glance_size) for k in knobs] == [
        (1, None, 32, 32), (2, None, 32, 32), (4, None, 32, 32), (4, 0.5, 32, 32), (4, 0.9, 32, 32),
        (4, None, 24, 32), (4, None, 32, 16)]
    assert [k.label(tiny) for k in knobs[3:]] == ["K=4 τ=0.5", "K=4 τ=0.9", "K=4 P=24", "K=4 G=16"]
    assert [k.k for k in pareto.plan(tiny.replace(dense=True))] == [1, 2, 4, 8, 16]
    names = {(): "AVGN", ("audio=false",): "visual-only glance",
             ("temporal=uniform", "spatial=center", "audio=false"): "uniform+centre",
             ("temporal=uniform", "spatial=center"): "uniform+centre + audio",
             ("spatial=random",): "AV-TeST+random patch + audio", ("dense=true", "audio=false"): "dense"}
    for overrides, name in names.items():
        assert pareto.method_name(tiny.with_overrides(list(overrides))) == name
    assert pareto.default_patch_sizes(AVGNConfig()) == [96, 160]
    assert pareto.default_glance_sizes(AVGNConfig()) == [112, 168]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A written AVSynth (8 train / 4 val / 4 test videos) and three checkpoints trained on it for one epoch."""
    root = tmp_path_factory.mktemp("pareto")
    data = write_dataset(root / "data", 16, seed=4, config=SMALL, splits=(0.5, 0.25, 0.25))
    common = ["--data", str(data), "--set", "num_frames=8", "--set", "k=2", "--epochs", "1", "--batch-size", "4",
              "--audio-warmup-epochs", "0", "--look-epochs", "0", "--cache-dir", str(root / "cache")]
    for name, overrides in RUNS.items():
        sets = [arg for item in overrides for arg in ("--set", item)]
        assert cli_main(["train", *common, *sets, "--out", str(root / name)]) == 0
    return root, data


def _table_rows(md: str) -> dict[tuple[str, str], list[str]]:
    rows = [line.strip("|").split("|") for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    cells = [[c.strip() for c in row] for row in rows[1:]]
    return {(row[0], row[1]): row[2:] for row in cells}


def test_quick_sweep_end_to_end(trained, tmp_path, capsys):
    root, data = trained
    ckpts = {name: root / name / "best.pt" for name in RUNS}
    out = tmp_path / "out"
    args = ["pareto", "--checkpoint", str(ckpts["avgn"]), "--baseline", str(ckpts["uniform"]), "--baseline",
            str(ckpts["dense"]), "--data", str(data), "--out", str(out), "--quick", "--cache-dir", str(root / "cache"),
            "--batch-size", "3", "--device", "cpu"]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert all((out / name).is_file() for name in pareto.FILES)

    result = pareto.read_json(out / "pareto.json")
    points = result.points
    assert pareto.read_csv(out / "pareto.csv") == points
    assert result.methods == ["AVGN", "uniform+centre", "dense + audio"]
    assert result.split == "test" and (result.backend, result.precision) == ("eager", "fp32") and "CPU" in result.device
    for p in points:
        assert 0 <= p.top1 <= 1 and 0 <= p.mean_ap <= 1 and p.videos == 4 and p.videos_per_s > 0
    assert [p.frontier for p in points] == pareto.pareto_frontier([(p.gflops, p.top1) for p in points])
    assert any(p.frontier for p in points)

    for name, ckpt in ckpts.items():
        model = load_checkpoint(ckpt).model
        mine = [p for p in points if p.checkpoint == str(ckpt)]
        plain = sorted((p for p in mine if p.exit_threshold is None), key=lambda p: p.k)
        steps = model.config.num_frames if model.config.dense else model.config.k
        assert [p.k for p in plain] == [k for k in pareto.KS if k <= steps]
        cost = model.cost()
        for p in plain:  # no early exit: every video pays for K steps
            assert p.mean_steps == p.k
            assert p.gflops == pytest.approx(cost.per_video + p.k * cost.per_step, rel=1e-6)
        assert all(a.gflops < b.gflops for a, b in zip(plain, plain[1:]))  # GFLOPs monotone in K
        exits = [p for p in mine if p.exit_threshold is not None]
        assert 1 <= len(exits) <= pareto.QUICK_THRESHOLDS, name
        assert all(p.k == steps and 1 <= p.mean_steps <= steps for p in exits)
        assert all(p.patch_size == model.config.patch_size and p.glance_size == model.config.glance_size for p in mine)

    # each point against evaluate(), the trainer's independent evaluation over the same decoded clips
    test = FolderSource(FolderDataset(data, SMALL, split="test", cache_dir=root / "cache"))
    for p in points:
        if p.method == "uniform+centre" or (p.method == "AVGN" and p.exit_threshold is None and p.k != 1):
            continue  # enough: AVGN at K=1 and its exits, every dense point
        model = load_checkpoint(p.checkpoint).model
        ref = evaluate(model, test, batch_size=4, k=p.k, exit_threshold=p.exit_threshold)
        assert (p.top1, p.videos) == (ref.top1, ref.videos)
        assert p.mean_ap == pytest.approx(ref.mean_ap, abs=1e-6)
        assert p.gflops == pytest.approx(ref.gflops, rel=1e-6)

    md = (out / "pareto.md").read_text()
    rows = _table_rows(md)
    assert len(rows) == len(points)
    for p in points:
        row = rows[(p.method, p.setting)]
        assert row == [f"{100 * p.top1:.2f}", f"{100 * p.mean_ap:.2f}", f"{p.gflops:.4g}", f"{p.mean_steps:.2f}",
                       f"{p.videos_per_s:.1f}", "◆" if p.frontier else ""]
    assert pareto.markdown_table(result) in md and pareto.markdown_table(result) in printed
    with open(out / "pareto.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(points)
    assert json.loads((out / "pareto.json").read_text())["unit"].startswith("GMACs")

    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(out / "pareto.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300 and float(image.std()) > 0.01


def test_sweep_decodes_once_and_runs_the_sizes_the_weights_fit(trained):
    root, data = trained
    cache = root / "sweep-cache"
    ckpts = [root / "avgn" / "best.pt", root / "uniform" / "best.pt", root / "dense" / "best.pt"]
    kwargs = dict(cache_dir=cache, thresholds=0, ks=(2,), patch_sizes=[24, 200], glance_sizes=[16], device="cpu",
                  progress=False, log=lambda line: None)
    first = pareto.sweep(ckpts, data, **kwargs)
    assert first.decoded == 4  # the test split; no thresholds, so no validation pass
    assert pareto.sweep(ckpts, data, **kwargs).decoded == 0

    settings = {(p.method, p.setting) for p in first.points}
    for method in ("AVGN", "uniform+centre"):
        for setting in ("K=2 P=24", "K=2 G=16"):
            # run where the weights fit, otherwise a note says why
            ran = (method, setting) in settings
            noted = any(n.startswith(f"{method}: {setting} not run") for n in first.notes)
            assert ran != noted, (method, setting, first.notes)
        assert any(n.startswith(f"{method}: K=2 P=200 not run") and "exceeds" in n for n in first.notes)
    # without AESPA nothing ties the weights to G or P: both run, and match a model built at that size
    assert {("uniform+centre", "K=2 P=24"), ("uniform+centre", "K=2 G=16")} <= settings
    assert any(n.startswith("dense + audio: a dense model has no patch or glance") for n in first.notes)
    # two seeds of one method: its note once
    copy = root / "dense-seed1.pt"
    copy.write_bytes(ckpts[2].read_bytes())
    seeded = pareto.sweep([ckpts[2], copy], data, seeds=[0, 1], **kwargs)
    assert sum(n.startswith("dense + audio: a dense model has no patch or glance") for n in seeded.notes) == 1
    base = load_checkpoint(ckpts[1])
    test = FolderSource(FolderDataset(data, SMALL, split="test", cache_dir=cache))
    for setting, change in (("K=2 P=24", {"patch_size": 24}), ("K=2 G=16", {"glance_size": 16})):
        model = AVGN(base.model.config.replace(**change))
        model.load_state_dict(base.model.state_dict())
        ref = evaluate(model, test, batch_size=4)
        point = next(p for p in first.points if (p.method, p.setting) == ("uniform+centre", setting))
        assert (point.top1, point.gflops) == (ref.top1, pytest.approx(ref.gflops, rel=1e-6))


def test_pareto_errors_are_clear(trained, tmp_path):
    root, data = trained
    with pytest.raises(ValueError, match="at least one checkpoint"):
        pareto.sweep([], data, cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError):
        pareto.sweep([tmp_path / "missing.pt"], data, cache_dir=tmp_path)
    assert cli_main(["pareto", "--checkpoint", str(root / "avgn" / "best.pt"), "--data", str(data), "--out",
                     str(tmp_path), "--batch-size", "0"]) == 2


def _point(method, seed, top1, gflops, videos_per_s, *, tau=None, checkpoint=None, k=2):
    setting = pareto.Knobs(k, tau, 48, 32).label(AVGNConfig.from_name("tiny").replace(patch_size=48, glance_size=32))
    return pareto.ParetoPoint(method, checkpoint or f"{method}-{seed}.pt", setting, k, tau, 48, 32, top1, top1 / 2,
                              gflops, 1.0 if tau is not None else float(k), 10, videos_per_s, seed=seed)


def test_seed_aggregation_against_a_hand_computation():
    points = [
        _point("AVGN", 0, 0.80, 0.06, 100.0), _point("AVGN", 1, 0.90, 0.06, 120.0),
        _point("AVGN", 2, 0.70, 0.06, 110.0),
        # each seed's checkpoint has thresholds of its own: they pair up by rank
        _point("AVGN", 0, 0.50, 0.03, 200.0, tau=0.7), _point("AVGN", 0, 0.60, 0.04, 180.0, tau=0.9),
        _point("AVGN", 1, 0.40, 0.02, 210.0, tau=0.6), _point("AVGN", 1, 0.70, 0.05, 170.0, tau=0.95),
        _point("dense", 0, 0.30, 0.40, 20.0),
    ]
    rows = {(r.method, r.setting): r for r in pareto.seed_rows(points)}
    assert list(rows) == [("AVGN", "K=2"), ("AVGN", "K=2 τ#1"), ("AVGN", "K=2 τ#2"), ("dense", "K=2")]
    plain = rows[("AVGN", "K=2")]
    # top-1 mean 0.8, sample std sqrt((0² + 0.1² + 0.1²) / 2) = 0.1; videos/s mean 110, std 10
    assert plain.seeds == 3 and plain.top1 == pytest.approx((0.8, 0.1))
    assert plain.videos_per_s == pytest.approx((110, 10))
    assert plain.gflops == pytest.approx((0.06, 0.0))
    low = rows[("AVGN", "K=2 τ#1")]  # 0.5 and 0.4: mean 0.45, std sqrt(2 · 0.05² / 1) = 0.0707
    assert low.seeds == 2 and low.top1 == pytest.approx((0.45, 0.0707107), abs=1e-6)
    assert low.gflops == pytest.approx((0.025, 0.0070711), abs=1e-6)
    assert rows[("dense", "K=2")].top1 == (0.3, 0.0)  # one seed: no spread
    assert pareto.mean_std([2.0, 4.0, 9.0]) == pytest.approx((5.0, 13 ** 0.5))
    # frontier of the means: dense (0.40, 0.30) is dominated by AVGN K=2 (0.06, 0.80)
    assert [r.frontier for r in rows.values()] == [True, True, True, False]


def test_thresholds_near_one_keep_their_digits():
    tiny = AVGNConfig.from_name("tiny")
    labels = [pareto.Knobs(4, tau, tiny.patch_size, tiny.glance_size).label(tiny)
              for tau in (0.912, 0.9974, 0.99995, 0.99998, 1.0)]
    assert labels == ["K=4 τ=0.912", "K=4 τ=0.9974", "K=4 τ=0.999950", "K=4 τ=0.999980", "K=4 τ=1"]
    # in seed rows such thresholds pair up by rank like any others
    points = [_point("AVGN", seed, 0.9, 0.05, 100.0, tau=tau)
              for seed, taus in ((0, (0.99995, 0.99998)), (1, (0.99991, 0.999993))) for tau in taus]
    rows = [(r.setting, r.seeds) for r in pareto.seed_rows(points)]
    assert rows == [("K=2 τ#1", 2), ("K=2 τ#2", 2)]


def test_seeded_table_plot_and_caveat(tmp_path):
    points = [_point("AVGN", s, 0.8 + 0.05 * s, 0.06, 100.0 + s) for s in range(2)] + [
        _point("dense", s, 0.3, 0.4, 20.0) for s in range(2)]
    frontier = pareto.pareto_frontier([(p.gflops, p.top1) for p in points])
    points = [pareto.ParetoPoint(**{**vars(p), "frontier": f}) for p, f in zip(points, frontier)]
    result = pareto.ParetoResult(points, data="somewhere/avsynth", split="test", device="CPU", backend="eager",
                                 precision="fp32", date="2026-11-29T12:00:00", versions={},
                                 caveat="Plumbing check: no accuracy claim")
    assert pareto.seeded(result)
    table = pareto.markdown_table(result)
    assert table.startswith("**Plumbing check: no accuracy claim**")
    assert "| AVGN | K=2 | 2 | 82.50 ± 3.54 |" in table and "| dense | K=2 | 2 | 30.00 ± 0.00 |" in table
    paths = pareto.write_all(result, tmp_path)
    assert pareto.read_json(paths["json"]).caveat == result.caveat
    assert pareto.read_csv(paths["csv"]) == points  # the seeds survive the round trip
    image = matplotlib.image.imread(paths["png"])
    assert image.shape[1] > 1.8 * image.shape[0]  # two panels side by side: GFLOPs and videos/s
