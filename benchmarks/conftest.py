"""Fixtures of the CPU benchmarks that pytest-benchmark runs (``pytest benchmarks --benchmark-only``).

pytest puts this folder on ``sys.path`` (its default "prepend" import mode), so the benchmark scripts
import as modules here, as they import each other when run as scripts.
"""

from __future__ import annotations

from pathlib import Path

import bench_decode
import bench_predictor
import pytest

PREDICTOR_VIDEOS = 8


@pytest.fixture(scope="session")
def decode_media(request) -> dict[str, Path]:
    """``bench_decode.MEDIA`` by name, written once into pytest's cache folder (``.pytest_cache``) and kept,
    so later sessions, whose runs are compared with this one, time the very same files."""
    return bench_decode.write_media(request.config.cache.mkdir("avgn_bench_decode_media"))


@pytest.fixture(scope="session")
def predictor_inputs(tmp_path_factory) -> tuple[Path, list[str]]:
    """A random-weight tiny checkpoint and ``PREDICTOR_VIDEOS`` AVSynth mp4 files."""
    return bench_predictor.prepare(tmp_path_factory.mktemp("avgn_bench_predictor"), PREDICTOR_VIDEOS)


@pytest.fixture
def single_thread():
    """One torch thread during the test, the process not pinned: ``bench_decode``'s default mode."""
    with bench_decode.single_thread():
        yield
