"""Careless and hostile inputs to folder datasets: labels.csv paths outside the folder or spelled twice, damaged
decoded-clip cache entries, failures that must not be cached, and the cache folder's fallback, on real media."""

import contextlib
import json
import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from media import write_garbage, write_video

from avgn_fast.checkpoint import save_checkpoint
from avgn_fast.cli import build_parser
from avgn_fast.cli import main as cli_main
from avgn_fast.config import AVGNConfig
from avgn_fast.data.decode import DecodeError, DecodeParams
from avgn_fast.data.folder import (
    ClipCache,
    FolderDataset,
    LabelEntry,
    decoded_split,
    default_cache_dir,
    read_labels,
    user_cache_dir,
)
from avgn_fast.models.avgn import AVGN

pytestmark = pytest.mark.usefixtures("one_thread")  # small shapes: see conftest

CONFIG = AVGNConfig.from_name("tiny").replace(num_frames=4, k=2, frame_size=32, resize_shorter=32, patch_size=16)
NOBODY = 65534


def write_labels(root, text):
    root.mkdir(parents=True, exist_ok=True)
    (root / "labels.csv").write_text(text)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Two real clips (one with audio, one without) and a garbage file, outside any dataset folder."""
    root = tmp_path_factory.mktemp("media")
    return {"a": write_video(root / "a.mp4", seed=1), "c": write_video(root / "c.avi", codec="mjpeg", audio=None,
                                                                          seed=3),
            "bad": write_garbage(root / "bad.mp4")}


def dataset_folder(root, media, rows="path,label\na.mp4,dog\nc.avi,cat\n"):
    """A dataset folder holding copies of the module's clips and ``rows`` as labels.csv."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("a", "c"):
        shutil.copy(media[name], root / media[name].name)
    write_labels(root, rows)
    return root


def entry_file(ds: FolderDataset, i: int = 0):
    return ds.cache.entry_file(ds.cache.key(ds.path_of(ds.entries[i])))


def same_clip(a, b) -> bool:
    return (torch.equal(a.frames, b.frames) and torch.equal(a.mel, b.mel) and torch.equal(a.frame_times, b.frame_times)
            and (a.audio_present, a.duration, a.fps, a.source_size, a.resize_shorter, a.path, a.notes)
            == (b.audio_present, b.duration, b.fps, b.source_size, b.resize_shorter, b.path, b.notes))


# labels.csv: paths resolved against the folder ------------------------------------------------------------------

@pytest.mark.parametrize("path", ["../x.mp4", "sub/../../x.mp4", "/abs/x.mp4", "./../x.mp4"])
def test_paths_outside_the_folder_are_refused_with_file_and_line(tmp_path, path):
    write_labels(tmp_path / "set", f"path,label\na.mp4,dog\n{path},cat\n")
    with pytest.raises(ValueError, match=r"labels\.csv:3: .*--allow-outside") as e:
        read_labels(tmp_path / "set")
    assert str(e.value).startswith(f"{tmp_path / 'set' / 'labels.csv'}:3: ") and repr(path) in str(e.value)
    entries = read_labels(tmp_path / "set", allow_outside=True)
    assert entries == [LabelEntry("a.mp4", "dog"), LabelEntry(path, "cat")]


def test_symlink_leading_out_is_refused_and_inside_paths_pass(tmp_path, media):
    root = tmp_path / "set"
    (root / "sub").mkdir(parents=True)
    (root / "link.mp4").symlink_to(media["a"])
    write_labels(root, "path,label\nsub/../inside.mp4,dog\nsub/x.mp4,cat\nlink.mp4,cat\n")
    with pytest.raises(ValueError, match=r"labels\.csv:4: path 'link\.mp4' leads outside"):
        read_labels(root)
    assert len(read_labels(root, allow_outside=True)) == 3


@pytest.mark.parametrize("first, second", [("a.mp4", "./a.mp4"), ("a.mp4", "sub/../a.mp4"), ("./a.mp4", "a.mp4"),
                                           ("sub/b.mp4", "sub//b.mp4")])
@pytest.mark.parametrize("labels", [("dog", "dog"), ("dog", "cat")])
def test_one_file_spelled_twice_is_refused_naming_the_first_line(tmp_path, first, second, labels):
    write_labels(tmp_path, f"path,label\n{first},{labels[0]}\nother.mp4,dog\n{second},{labels[1]}\n")
    with pytest.raises(ValueError, match=rf"labels\.csv:4: duplicate path '{second}' \(first on line 2 as "
                                         rf"'{first}'\)"):
        read_labels(tmp_path)


def test_absolute_spelling_of_an_inside_file_is_a_duplicate_even_when_allowed(tmp_path):
    write_labels(tmp_path, f"path,label\na.mp4,dog\n{tmp_path / 'a.mp4'},cat\n")
    with pytest.raises(ValueError, match="labels.csv:3: absolute path"):
        read_labels(tmp_path)
    with pytest.raises(ValueError, match=r"labels\.csv:3: duplicate path .* \(first on line 2 as 'a\.mp4'\)"):
        read_labels(tmp_path, allow_outside=True)


def test_allowed_outside_file_is_decoded(tmp_path, media):
    root = tmp_path / "set"
    write_labels(root, f"path,label\n{os.path.relpath(media['a'], root)},dog\n{media['c']},cat\n")
    with pytest.raises(ValueError, match="labels.csv:2: path '../"):
        FolderDataset(root, CONFIG)
    ds = decoded_split(root, CONFIG, None, allow_outside=True, log=lambda line: None)
    assert len(ds) == 2 and ds.classes == ["cat", "dog"]
    clip, label = ds[0]
    assert clip.frames.shape == (4, 3, 32, 32) and label == 1 and clip.audio_present
    assert os.path.samefile(clip.path, media["a"]) and not ds[1][0].audio_present


def test_allow_outside_flag_on_every_folder_command(tmp_path):
    parser = build_parser()
    common = ["--data", "d", "--allow-outside"]
    argvs = {"train": ["train", *common, "--out", "o"], "eval": ["eval", *common, "--checkpoint", "c"],
             "calibrate": ["calibrate", *common, "--checkpoint", "c"],
             "pareto": ["pareto", *common, "--checkpoint", "c", "--out", "o"]}
    for name, argv in argvs.items():
        assert vars(parser.parse_args(argv))["allow_outside"] is True, name
        assert vars(parser.parse_args([a for a in argv if a != "--allow-outside"]))["allow_outside"] is False, name


# the decoded-clip cache: damaged entries are decoded again and overwritten -----------------------------------------

def _truncated(file):
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2])


def _nul_filled(file):  # what a file can hold after a crash on some filesystems
    file.write_bytes(bytes(file.stat().st_size))


def _json(file):
    file.write_text(json.dumps({"frames": [1, 2, 3]}))


def _empty(file):
    file.write_bytes(b"")


def _foreign_state_dict(file):
    torch.save({"weight": torch.randn(3, 3), "bias": torch.zeros(3)}, file)


def _foreign_list(file):
    torch.save([torch.zeros(4, 3, 32, 32, dtype=torch.uint8)], file)


def _edit(change):
    """A damage that loads the valid entry and rewrites it changed by ``change(payload)``."""
    def damage(file):
        payload = torch.load(file, weights_only=True)
        change(payload)
        torch.save(payload, file)
    return damage


def _flat_old_form(payload):  # the layout of an earlier version: clip fields at the top, no key
    clip = payload.pop("clip")
    payload.clear()
    payload.update(clip)


def _set(field, value):
    return _edit(lambda payload: payload["clip"].__setitem__(field, value(payload["clip"][field])))


DAMAGES = {
    "truncated": _truncated,
    "nul-filled": _nul_filled,
    "json": _json,
    "empty": _empty,
    "foreign state_dict": _foreign_state_dict,
    "foreign list": _foreign_list,
    "older version": _edit(lambda p: p.__setitem__("version", p["version"] - 1)),
    "older layout": _edit(_flat_old_form),
    "other file's key": _edit(lambda p: p.__setitem__("key", "0" * 64)),
    "missing field": _edit(lambda p: p["clip"].pop("fps")),
    "extra field": _edit(lambda p: p["clip"].__setitem__("extra", 1)),
    "frames of fewer frames": _set("frames", lambda x: x[:-1]),
    "frames of another size": _set("frames", lambda x: torch.zeros(4, 3, 16, 16, dtype=torch.uint8)),
    "frames as float": _set("frames", lambda x: x.float()),
    "mel of other n_mels": _set("mel", lambda x: x[:, :-1]),
    "mel as float64": _set("mel", lambda x: x.double()),
    "mel of other steps": _set("mel", lambda x: x[..., :-1]),
    "frame_times of other length": _set("frame_times", lambda x: x[:-1]),
    "other resize_shorter": _set("resize_shorter", lambda x: x + 8),
    "source_size not a pair": _set("source_size", lambda x: [x[0]]),
    "audio_present not a bool": _set("audio_present", lambda x: "yes"),
    "duration a string": _set("duration", lambda x: str(x)),
    "notes not strings": _set("notes", lambda x: [1, 2]),
    "error not a string": _edit(lambda p: (p.pop("clip"), p.__setitem__("error", 5))),
}


@pytest.mark.parametrize("damage", DAMAGES.values(), ids=DAMAGES.keys())
def test_damaged_entry_is_decoded_again_and_overwritten(tmp_path, media, damage):
    root = dataset_folder(tmp_path / "set", media)
    cache = tmp_path / "cache"
    first = FolderDataset(root, CONFIG, cache_dir=cache)
    original = first[0][0]
    file = entry_file(first)
    damage(file)

    damaged = FolderDataset(root, CONFIG, cache_dir=cache)
    assert same_clip(damaged[0][0], original) and damaged.decodes == 1
    repaired = FolderDataset(root, CONFIG, cache_dir=cache)
    assert same_clip(repaired[0][0], original) and repaired.decodes == 0  # the entry was written anew
    assert [p.name for p in file.parent.iterdir()] == [file.name]  # no temporary file left behind


def test_damaged_entries_do_not_stop_decode_all(tmp_path, media):
    root = dataset_folder(tmp_path / "set", media)
    cache = tmp_path / "cache"
    first = FolderDataset(root, CONFIG, cache_dir=cache)
    assert first.decode_all() == [] and first.decodes == 2
    _nul_filled(entry_file(first, 0))
    _json(entry_file(first, 1))
    again = decoded_split(root, CONFIG, None, cache_dir=cache, log=lambda line: None)
    assert len(again) == 2 and again.decodes == 2


def test_cached_clip_is_served_with_the_readers_path(tmp_path, media):
    root = dataset_folder(tmp_path / "set", media)
    cache = tmp_path / "cache"
    FolderDataset(root, CONFIG, cache_dir=cache).decode_all()
    spelled = FolderDataset(tmp_path / "set" / ".." / "set", CONFIG, cache_dir=cache)  # same files, resolved key
    clip = spelled[0][0]
    assert spelled.decodes == 0 and clip.path == str(tmp_path / "set" / ".." / "set" / "a.mp4")


def test_change_in_the_last_64_kib_is_seen(tmp_path):
    """A file over 128 KiB rewritten only near its end, with its size and mtime kept, is decoded again."""
    root = tmp_path / "set"
    root.mkdir()
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (20, 160, 160, 3), dtype=np.uint8)  # noise: MJPEG keeps it large
    video = write_video(root / "big.avi", codec="mjpeg", audio=None, frames=frames)
    size = video.stat().st_size
    assert size > 2 * 64 * 1024  # the hashed head and tail do not overlap
    write_labels(root, "path,label\nbig.avi,dog\n")
    cache = tmp_path / "cache"
    assert FolderDataset(root, CONFIG, cache_dir=cache).decode_all() == []
    stat = video.stat()
    with open(video, "r+b") as f:
        f.seek(size - 1000)
        byte = f.read(1)
        f.seek(size - 1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert video.stat().st_size == size and video.stat().st_mtime_ns == stat.st_mtime_ns
    again = FolderDataset(root, CONFIG, cache_dir=cache)
    again.decode_all()
    assert again.decodes == 1


# which failures are cached ------------------------------------------------------------------------------------------

def test_deterministic_failure_is_cached_transient_one_is_not(tmp_path, media):
    """The cache's side of the rule, with the errors built here: which failures are transient is decode's call.

    A transient ``DecodeError`` (e.g. permission denied) handed to ``store`` writes nothing; a failure of the
    file's content is stored and read back as the same error.
    """
    video = media["bad"]
    cache = ClipCache(tmp_path / "cache", DecodeParams.from_config(CONFIG), "pyav")
    key = cache.key(video)
    transient = DecodeError(video, "PermissionError: [Errno 13] Permission denied", transient=True)
    assert cache.store(video, key, transient) is False
    assert cache.load(video, key) is None and not (tmp_path / "cache").exists()
    content = DecodeError(video, "InvalidDataError: Invalid data found when processing input")
    assert cache.store(video, key, content) is True
    loaded = cache.load(video, key)
    assert isinstance(loaded, DecodeError) and str(loaded) == str(content) and loaded.transient is False


@contextlib.contextmanager
def as_nobody():
    """Run the block as an unprivileged user: root reads any file whatever its mode bits."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.fixture
def shared_tmp():
    """A folder every user may enter and write (pytest's own tmp folders are private to root)."""
    path = tempfile.mkdtemp()
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path)


def test_permission_denied_is_not_cached(shared_tmp, media):
    """A file the user cannot read fails, leaves no cache entry, and decodes once it is readable again."""
    root = dataset_folder(Path(shared_tmp) / "set", media)
    os.chmod(root, 0o755)
    cache = Path(shared_tmp) / "cache"
    cache.mkdir(mode=0o777)
    os.chmod(cache, 0o777)
    os.chmod(root / "a.mp4", 0)
    ds = FolderDataset(root, CONFIG, cache_dir=cache)
    with as_nobody(), pytest.raises(DecodeError, match="a.mp4"):
        ds[0]
    assert list(cache.rglob("*.pt")) == []
    os.chmod(root / "a.mp4", 0o644)
    readable = FolderDataset(root, CONFIG, cache_dir=cache)
    assert readable[0][0].frames.shape == (4, 3, 32, 32) and readable.decodes == 1


# writes: atomic, unique per thread, failures survivable ------------------------------------------------------------

def test_concurrent_writers_leave_one_valid_entry(tmp_path, media):
    root = dataset_folder(tmp_path / "set", media)
    ds = FolderDataset(root, CONFIG, cache_dir=tmp_path / "cache")
    clip = ds[0][0]
    cache, path = ds.cache, ds.path_of(ds.entries[0])
    key = cache.key(path)
    failures = []

    def write():
        try:
            for _ in range(5):
                assert cache.store(path, key, clip)
        except BaseException as e:  # collected: a thread's exception does not fail the test by itself
            failures.append(e)

    threads = [threading.Thread(target=write) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert same_clip(cache.load(path, key), clip)
    assert [p.name for p in entry_file(ds).parent.iterdir()] == [entry_file(ds).name]


def test_unwritable_cache_warns_once_and_decoding_goes_on(tmp_path, media):
    root = dataset_folder(tmp_path / "set", media)
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    ds = FolderDataset(root, CONFIG, cache_dir=blocker)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ds.decode_all() == [] and len(ds) == 2
    assert len(caught) == 1 and "cannot write the decoded-clip cache" in str(caught[0].message)
    assert ds[1][0].frames.shape == (4, 3, 32, 32)


# the default cache folder -------------------------------------------------------------------------------------------

def test_default_cache_dir_prefers_the_given_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    lines = []
    assert default_cache_dir(tmp_path / "run" / "cache", log=lines.append) == tmp_path / "run" / "cache"
    assert (tmp_path / "run" / "cache").is_dir() and lines == [] and not (tmp_path / "xdg").exists()


def test_default_cache_dir_falls_back_to_the_user_cache(tmp_path, monkeypatch):
    """A preferred folder that cannot be created (its parent is a regular file: fails for root too)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (tmp_path / "ckpt.pt").write_text("not a folder")
    lines = []
    chosen = default_cache_dir(tmp_path / "ckpt.pt" / "cache", log=lines.append)
    assert chosen == tmp_path / "xdg" / "avgn_fast" / "clips" and chosen.is_dir()
    assert len(lines) == 1 and str(tmp_path / "ckpt.pt" / "cache") in lines[0] and str(chosen) in lines[0]


def test_user_cache_dir_ignores_a_relative_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert user_cache_dir() == tmp_path / ".cache" / "avgn_fast" / "clips"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert user_cache_dir() == tmp_path / ".cache" / "avgn_fast" / "clips"


def test_default_cache_dir_with_nowhere_to_write(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file" / "xdg"))
    with pytest.raises(ValueError, match="no writable decoded-clip cache: .*--cache-dir"):
        default_cache_dir(tmp_path / "file" / "cache", log=lambda line: None)


def test_eval_falls_back_when_the_checkpoint_folder_cannot_hold_the_cache(tmp_path, media, monkeypatch, capsys):
    """``eval`` with ``CHECKPOINT_DIR/cache`` taken by a regular file: one log line, clips cached in the user cache;
    its labels.csv names a file outside the folder, refused (exit 2, ``file:line``) until ``--allow-outside``."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    shutil.copy(media["c"], tmp_path / "c.avi")
    root = dataset_folder(tmp_path / "set", media, rows="path,label\na.mp4,dog\n../c.avi,cat\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "cache").write_text("in the way")
    torch.manual_seed(0)
    save_checkpoint(run / "best.pt", AVGN(CONFIG.replace(num_classes=2)), class_names=["cat", "dog"])
    argv = ["eval", "--checkpoint", str(run / "best.pt"), "--data", str(root), "--split", "all", "--device", "cpu"]
    assert cli_main(argv) == 2
    assert f"{root / 'labels.csv'}:3: path '../c.avi' leads outside" in capsys.readouterr().err
    assert cli_main([*argv, "--allow-outside"]) == 0
    out = capsys.readouterr().out
    fallback = tmp_path / "xdg" / "avgn_fast" / "clips"
    assert out.count("cannot write the decoded-clip cache") == 1 and f"using {fallback}" in out
    assert "2 videos" in out and len(list(fallback.rglob("*.pt"))) == 2
    assert (run / "cache").read_text() == "in the way"


def test_train_refuses_an_outside_path_before_building_a_model(tmp_path, media, capsys):
    root = dataset_folder(tmp_path / "set", media, rows="path,label,split\na.mp4,dog,train\n/c.avi,cat,train\n")
    argv = ["train", "--data", str(root), "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert cli_main(argv) == 2
    assert f"{root / 'labels.csv'}:3: absolute path '/c.avi' refused" in capsys.readouterr().err
    assert not (tmp_path / "out" / "last.pt").exists()
