"""The CPU benchmarks under pytest-benchmark, one torch thread: ``pytest benchmarks --benchmark-only``.

Per file of ``bench_decode.MEDIA``, grouped by file so the table's ratio columns read against the
codec's floor: our decode, PyAV decoding every video frame (the floor), every video and audio frame,
the least a decoder of every frame returning the model's input spends (``BoundParts``), and DALI's CPU
reader (skipped where it cannot read the codec). Then the naive per-file loop and the Predictor of
``bench_predictor`` on a few AVSynth videos, grouped together. Save a run with
``--benchmark-save=NAME`` (or ``--benchmark-autosave``; runs go to ``.benchmarks/``) and compare a
later one with ``--benchmark-compare``. The normal test run collects only ``tests/`` and passes
``--benchmark-skip``, so these never run there.
"""

from __future__ import annotations

import bench_decode
import bench_predictor
import pytest

from avgn_fast.data.synth import CLASS_NAMES

MEDIA = {m.name: m for m in bench_decode.MEDIA}
PREDICTOR_BATCH = 8

pytestmark = pytest.mark.usefixtures("single_thread")


def timed(benchmark, fn, *args):
    """``benchmark(fn, *args)`` after one untimed call: first-call work (imports, DALI's pipeline build, the
    model's GFLOPs count) would otherwise land in the first round."""
    fn(*args)
    return benchmark(fn, *args)


@pytest.mark.parametrize("name", list(MEDIA))
def test_decode_ours(benchmark, decode_media, name):
    m = MEDIA[name]
    benchmark.group = f"decode {name}"
    clip = timed(benchmark, bench_decode.decode_ours, decode_media[name], m.config)
    kw = bench_decode.decode_kwargs(m.config)
    assert clip.frames.shape == (kw["num_frames"], 3, kw["size"], kw["size"])
    assert clip.mel.shape[:2] == (kw["num_frames"], kw["n_mels"])
    assert clip.audio_present  # every benchmark file has an audio track


@pytest.mark.parametrize("name", list(MEDIA))
def test_decode_floor(benchmark, decode_media, name):
    benchmark.group = f"decode {name}"
    assert timed(benchmark, bench_decode.decode_floor, decode_media[name]) == MEDIA[name].frames


@pytest.mark.parametrize("name", list(MEDIA))
def test_decode_floor_with_audio(benchmark, decode_media, name):
    benchmark.group = f"decode {name}"
    video, audio = timed(benchmark, bench_decode.decode_floor_av, decode_media[name])
    assert video == MEDIA[name].frames and audio > 0

@pytest.mark.parametrize("name", list(MEDIA))
def test_decode_bound(benchmark, decode_media, name):
    """(e): every frame of both streams, opened from the headers, plus the least work on the model's side."""
    m = MEDIA[name]
    benchmark.group = f"decode {name}"
    bound = bench_decode.BoundParts(decode_media[name], m.config)
    timed(benchmark, bound.run)
    assert len(bound.frames) == bench_decode.decode_kwargs(m.config)["num_frames"] and bound.wave.numel() > 0


@pytest.mark.parametrize("name", list(MEDIA))
def test_decode_dali_cpu(benchmark, decode_media, name):
    m = MEDIA[name]
    reason = bench_decode.dali_unavailable(decode_media[name], m.config)
    if reason:
        pytest.skip(f"DALI CPU n/a: {reason}")
    benchmark.group = f"decode {name}"
    clip = timed(benchmark, bench_decode.decode_dali, decode_media[name], m.config)
    kw = bench_decode.decode_kwargs(m.config)
    assert clip.frames.shape == (kw["num_frames"], 3, kw["size"], kw["size"])


def test_naive_loop(benchmark, predictor_inputs):
    from avgn_fast.checkpoint import load

    ckpt, paths = predictor_inputs
    model = load(ckpt)
    benchmark.group = f"classify {len(paths)} AVSynth videos"
    results = timed(benchmark, bench_predictor.naive_loop, model, paths)
    assert len(results) == len(paths)
    assert all(r.final_logits.shape == (1, len(CLASS_NAMES)) for r in results)


def test_predictor(benchmark, predictor_inputs):
    from avgn_fast.engine.predictor import Predictor

    ckpt, paths = predictor_inputs
    pred = Predictor(ckpt, device="cpu", batch_size=PREDICTOR_BATCH, num_workers=1)
    benchmark.group = f"classify {len(paths)} AVSynth videos"
    rows = timed(benchmark, bench_predictor.predict_all, pred, paths)
    assert [r.path for r in rows] == paths
    assert all(r.label in CLASS_NAMES for r in rows)
