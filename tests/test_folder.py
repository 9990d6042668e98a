"""labels.csv parsing and the cached folder dataset, on real encoded files."""

import os

import pytest
import torch
from media import write_garbage, write_video

from avgn_fast.config import AVGNConfig
from avgn_fast.data.clip import Clip
from avgn_fast.data.decode import DecodeError
from avgn_fast.data.folder import FolderDataset, LabelEntry, class_names, read_labels

CONFIG = AVGNConfig.from_name("tiny").replace(num_frames=4, k=2, frame_size=32, resize_shorter=32, patch_size=16)


def write_labels(root, text):
    root.mkdir(parents=True, exist_ok=True)
    (root / "labels.csv").write_text(text)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    (root / "clips").mkdir()
    write_video(root / "clips" / "a.webm", codec="vp9", audio="opus", sample_rate=16000, seed=1)
    write_video(root / "clips" / "b.mp4", seed=2)
    write_video(root / "clips" / "c.avi", codec="mjpeg", audio=None, seed=3)
    write_garbage(root / "clips" / "bad.mp4")
    write_labels(root, "path,label,split\nclips/a.webm,dog,train\nclips/b.mp4,cat,train\n"
                       "clips/c.avi,dog,val\nclips/bad.mp4,cat,train\n")
    return root


def test_read_labels_columns_in_any_order_and_optional_split(tmp_path):
    write_labels(tmp_path / "x", "label,path\n\ndog, v1.mp4 \ncat,sub/v2.webm\n")
    assert read_labels(tmp_path / "x") == [LabelEntry("v1.mp4", "dog"), LabelEntry("sub/v2.webm", "cat")]
    write_labels(tmp_path / "y", "path,label,split\nv1.mp4,b,train\nv2.mp4,a,\nv3.mp4,c,test\n")
    entries = read_labels(tmp_path / "y")
    assert [e.split for e in entries] == ["train", None, "test"]
    assert class_names(entries) == ["a", "b", "c"]


@pytest.mark.parametrize("text, where", [
    ("path,lable\nv.mp4,dog\n", "labels.csv:1: header"),
    ("path,label\nv.mp4,dog\nw.mp4\n", "labels.csv:3: expected 2 fields"),
    ("path,label\nv.mp4,dog\n\nw.mp4,\n", "labels.csv:4: empty path or label"),
    ("path,label\nv.mp4,dog\nv.mp4,cat\n", "labels.csv:3: duplicate path 'v.mp4' \\(first on line 2\\)"),
    ("path,label\n", "labels.csv: no rows"),
    ("", "labels.csv: empty"),
])
def test_read_labels_errors_name_file_and_line(tmp_path, text, where):
    write_labels(tmp_path, text)
    with pytest.raises(ValueError, match=where):
        read_labels(tmp_path)


def test_missing_labels_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="labels.csv"):
        read_labels(tmp_path)


def test_items_labels_and_bad_files(folder):
    ds = FolderDataset(folder, CONFIG)
    assert len(ds) == 4 and ds.classes == ["cat", "dog"]
    clip, label = ds[0]
    assert isinstance(clip, Clip) and clip.frames.shape == (4, 3, 32, 32) and label == 1
    assert clip.path == str(folder / "clips" / "a.webm")
    assert ds[1][1] == 0 and not ds[2][0].audio_present
    with pytest.raises(DecodeError, match="bad.mp4"):
        ds[3]
    assert [e.path for e in ds.errors] == [str(folder / "clips" / "bad.mp4")]
    assert ds[0][0].frames.shape == (4, 3, 32, 32)  # the dataset keeps working after a bad file


def test_split_keeps_global_class_indices(folder):
    val = FolderDataset(folder, CONFIG, split="val")
    assert len(val) == 1 and val.classes == ["cat", "dog"] and val[0][1] == 1
    with pytest.raises(ValueError, match="splits present: \\['train', 'val'\\]"):
        FolderDataset(folder, CONFIG, split="test")


def test_cache_serves_second_epoch_without_decoding(folder, tmp_path):
    cache = tmp_path / "cache"
    first = FolderDataset(folder, CONFIG, split="train", cache_dir=cache)
    errors = first.decode_all()
    assert [e.path for e in errors] == [str(folder / "clips" / "bad.mp4")] and len(first) == 2
    assert first.decodes == 3
    epoch1 = [first[i] for i in range(len(first))]
    assert first.decodes == 3

    second = FolderDataset(folder, CONFIG, split="train", cache_dir=cache)
    epoch2 = [second[i] for i in range(len(second) - 1)]
    assert second.decodes == 0
    for (c1, l1), (c2, l2) in zip(epoch1, epoch2):
        assert l1 == l2 and torch.equal(c1.frames, c2.frames) and torch.equal(c1.mel, c2.mel)
        assert (c1.audio_present, c1.duration, c1.fps, c1.source_size) == (c2.audio_present, c2.duration, c2.fps,
                                                                           c2.source_size)
    with pytest.raises(DecodeError, match="bad.mp4"):  # the failure is cached too
        second[2]
    assert second.decodes == 0


def test_cache_is_keyed_on_content_size_and_mtime(folder, tmp_path):
    root = tmp_path / "copy"
    (root / "clips").mkdir(parents=True)
    video = root / "clips" / "a.webm"
    original_bytes = (folder / "clips" / "a.webm").read_bytes()
    video.write_bytes(original_bytes)
    write_labels(root, "path,label\nclips/a.webm,dog\n")
    cache = tmp_path / "cache"
    ds = FolderDataset(root, CONFIG, cache_dir=cache)
    original = ds[0][0]
    stat = video.stat()
    video.write_bytes(bytes(stat.st_size))  # same size and mtime, other content: decoded again
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    garbage = FolderDataset(root, CONFIG, cache_dir=cache)
    with pytest.raises(DecodeError):
        garbage[0]
    assert garbage.decodes == 1
    video.write_bytes(original_bytes)  # the original content back, same mtime: its entry serves again
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = FolderDataset(root, CONFIG, cache_dir=cache)
    assert torch.equal(again[0][0].frames, original.frames) and again.decodes == 0
    os.utime(video, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a newer mtime: decoded again
    touched = FolderDataset(root, CONFIG, cache_dir=cache)
    assert torch.equal(touched[0][0].frames, original.frames) and touched.decodes == 1
    other_params = FolderDataset(root, CONFIG.replace(num_frames=2, k=2), cache_dir=cache)
    assert other_params[0][0].frames.shape[0] == 2 and other_params.decodes == 1
