"""Folder datasets: ``DIR/labels.csv`` over video files, decoded once and cached on disk.

``labels.csv`` has a header naming the columns ``path,label`` and optionally ``split`` (any order);
each row is one video, ``path`` relative to ``DIR`` (any format PyAV opens), ``split`` free text such
as ``train``/``val``/``test``. Class indices come from ``class_names`` over every row, so all splits
of one folder agree on them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from avgn_fast.config import AVGNConfig
from avgn_fast.data.clip import Clip
from avgn_fast.data.decode import DecodeError, DecodeParams, decode_many

LABELS_FILE = "labels.csv"
_COLUMNS = ("path", "label", "split")
_CACHE_VERSION = 2  # bump when the decoded form changes, so stale cache entries are never read (2: AAC start)


@dataclass(frozen=True)
class LabelEntry:
    """One row of ``labels.csv``: ``path`` as written (relative to the folder), label, split or None."""

    path: str
    label: str
    split: str | None = None


def read_labels(root) -> list[LabelEntry]:
    """Parse ``root/labels.csv``; a malformed file raises ValueError naming the file and the line."""
    file = Path(root) / LABELS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: not found (expected a CSV with columns path,label[,split])")
    with open(file, newline="", encoding="utf-8-sig") as f:
        rows = [(n, row) for n, row in enumerate(csv.reader(f), start=1) if any(cell.strip() for cell in row)]
    if not rows:
        raise ValueError(f"{file}: empty (expected a header path,label[,split])")
    line, header = rows[0]
    header = [h.strip().lower() for h in header]
    unknown = [h for h in header if h not in _COLUMNS]
    if unknown or "path" not in header or "label" not in header or len(set(header)) != len(header):
        raise ValueError(f"{file}:{line}: header must name the columns path,label[,split] once each, got {header}")
    entries, seen = [], {}
    for line, row in rows[1:]:
        if len(row) != len(header):
            raise ValueError(f"{file}:{line}: expected {len(header)} fields ({','.join(header)}), got {len(row)}")
        cells = dict(zip(header, (cell.strip() for cell in row)))
        if not cells["path"] or not cells["label"]:
            raise ValueError(f"{file}:{line}: empty path or label")
        if cells["path"] in seen:
            raise ValueError(f"{file}:{line}: duplicate path {cells['path']!r} (first on line {seen[cells['path']]})")
        seen[cells["path"]] = line
        entries.append(LabelEntry(cells["path"], cells["label"], cells.get("split") or None))
    if not entries:
        raise ValueError(f"{file}: no rows after the header")
    return entries


def class_names(entries: Iterable[LabelEntry]) -> list[str]:
    """Sorted distinct labels: the class index of a label is its position here."""
    return sorted({e.label for e in entries})


class FolderDataset(torch.utils.data.Dataset):
    """``(Clip, label_index)`` per row of ``root/labels.csv`` (optionally one ``split``).

    With ``cache_dir``, each decoded clip (or the error of a file that failed) is saved there with
    ``torch.save`` under a key of the file's absolute path, size and mtime, the decode parameters and
    the backend, so later epochs read it instead of decoding; a changed file is decoded again.
    Without ``cache_dir`` every access decodes. A file that cannot be decoded raises its
    ``DecodeError`` from ``__getitem__`` and is recorded in ``errors``; ``decode_all`` decodes (and
    caches) everything up front and drops the failures from the dataset. ``decodes`` counts the files
    this process actually decoded; ``errors`` likewise holds this process's failures only.
    """

    def __init__(self, root, config: AVGNConfig, *, split: str | None = None, cache_dir=None,
                 backend: str = "pyav"):
        self.root = Path(root)
        all_entries = read_labels(self.root)
        self.classes = class_names(all_entries)
        self.class_index = {name: i for i, name in enumerate(self.classes)}
        if split is None:
            self.entries = all_entries
        else:
            splits = sorted({e.split for e in all_entries if e.split is not None})
            self.entries = [e for e in all_entries if e.split == split]
            if not self.entries:
                raise ValueError(f"{self.root / LABELS_FILE}: no rows with split={split!r}; splits present: {splits}")
        self.config = config
        self.params = DecodeParams.from_config(config)
        self.backend = backend
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.errors: list[DecodeError] = []
        self.decodes = 0

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[Clip, int]:
        entry = self.entries[i]
        result = self._cached(entry)
        if result is None:
            result = self._decode([entry])[0]
        if isinstance(result, DecodeError):
            if all(str(e) != str(result) for e in self.errors):
                self.errors.append(result)
            raise result
        return result, self.class_index[entry.label]

    def path_of(self, entry: LabelEntry) -> Path:
        return self.root / entry.path

    def decode_all(self, progress: Callable[[Iterable], Iterable] | None = None,
                   batch_size: int = 8) -> list[DecodeError]:
        """Decode every uncached entry (``batch_size`` files per call), drop the failures, return their errors.

        ``progress`` wraps the iterable of batches (e.g. ``tqdm.tqdm``).
        """
        failed: dict[LabelEntry, DecodeError | None] = {}
        todo = []
        for entry in self.entries:
            cached = self._cached(entry)
            if cached is None:
                todo.append(entry)
            else:
                failed[entry] = cached if isinstance(cached, DecodeError) else None
        batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
        for batch in progress(batches) if progress is not None else batches:
            for entry, result in zip(batch, self._decode(batch)):
                failed[entry] = result if isinstance(result, DecodeError) else None
        errors = [failed[e] for e in self.entries if failed[e] is not None]
        self.entries = [e for e in self.entries if failed[e] is None]
        self.errors.extend(e for e in errors if all(str(e) != str(x) for x in self.errors))
        return errors

    def _decode(self, entries: list[LabelEntry]) -> list[Clip | DecodeError]:
        results = decode_many([self.path_of(e) for e in entries], self.config, self.backend)
        results = [r if isinstance(r, DecodeError) else replace(r, frames=r.frames.cpu(), mel=r.mel.cpu())
                   for r in results]
        self.decodes += len(entries)
        if self.cache_dir is not None:
            for entry, result in zip(entries, results):
                self._store(entry, result)
        return results

    def _key(self, entry: LabelEntry) -> str | None:
        path = self.path_of(entry).resolve()
        try:
            st = path.stat()
        except OSError:  # missing file: nothing to key on, decode reports it
            return None
        fields = [str(path), st.st_size, st.st_mtime_ns, self.backend, _CACHE_VERSION, asdict(self.params)]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def _cache_file(self, entry: LabelEntry) -> Path | None:
        key = self._key(entry) if self.cache_dir is not None else None
        return None if key is None else self.cache_dir / key[:2] / f"{key}.pt"

    def _cached(self, entry: LabelEntry) -> Clip | DecodeError | None:
        file = self._cache_file(entry)
        if file is None or not file.is_file():
            return None
        try:
            saved = torch.load(file, weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError):  # torn or foreign file: decode again
            return None
        if "error" in saved:
            return DecodeError(self.path_of(entry), saved["error"])
        saved["source_size"] = tuple(saved["source_size"])
        return Clip(**saved)

    def _store(self, entry: LabelEntry, result: Clip | DecodeError) -> None:
        file = self._cache_file(entry)
        if file is None:
            return
        if isinstance(result, DecodeError):
            payload = {"error": result.problem}
        else:
            payload = {"frames": result.frames, "mel": result.mel, "audio_present": result.audio_present,
                       "duration": result.duration, "fps": result.fps, "source_size": list(result.source_size),
                       "resize_shorter": result.resize_shorter, "frame_times": result.frame_times, "path": result.path}
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".{os.getpid()}.tmp")
        torch.save(payload, tmp)
        os.replace(tmp, file)  # atomic: concurrent DataLoader workers never read a torn file


def decoded_split(data, config: AVGNConfig, split: str | None, *, cache_dir=None, class_names=None,
                  progress: bool = False, log: Callable[[str], None] = print) -> FolderDataset:
    """``FolderDataset`` of ``split`` (None: every row) with every file decoded into the cache; files that fail
    are dropped, each with a ``log`` line naming it. ValueError when the folder's classes differ from
    ``class_names`` (a checkpoint's) or when no file of the split decodes."""
    from tqdm import tqdm

    dataset = FolderDataset(data, config, split=split, cache_dir=cache_dir)
    if class_names is not None and dataset.classes != list(class_names):
        raise ValueError(f"{data}: classes {dataset.classes} differ from the checkpoint's {list(class_names)}")
    desc = "decode" if split is None else f"decode {split}"
    for error in dataset.decode_all(progress=lambda batches: tqdm(batches, desc=desc, unit="batch",
                                                                  disable=not progress)):
        log(f"skipping {error}")
    if not len(dataset):
        raise ValueError(f"{data}: no decodable videos in split {split!r}")
    return dataset
