"""Folder datasets: ``DIR/labels.csv`` over video files, decoded once and cached on disk.

``labels.csv`` has a header naming the columns ``path,label`` and optionally ``split`` (any order);
each row is one video, ``path`` relative to ``DIR`` (any format PyAV opens), ``split`` free text such
as ``train``/``val``/``test``. Paths are resolved against ``DIR``: absolute paths and paths leaving it
are refused unless the caller opts in (``allow_outside``), and two rows naming one file (however
spelled) are refused. Class indices come from ``class_names`` over every row, so all splits of one
folder agree on them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from avgn_fast.config import AVGNConfig
from avgn_fast.data.clip import Clip
from avgn_fast.data.decode import DecodeError, DecodeParams, decode_many

LABELS_FILE = "labels.csv"
_COLUMNS = ("path", "label", "split")
# bump when the decoded form changes, so stale cache entries are never read (2: AAC start; 3: hardened decode)
_CACHE_VERSION = 3
_FINGERPRINT_SPAN = 64 * 1024  # bytes hashed at each end of a file: catches rewrites that keep size and mtime
_STORED_FIELDS = tuple(f.name for f in fields(Clip) if f.name != "path")  # path is the reader's own


@dataclass(frozen=True)
class LabelEntry:
    """One row of ``labels.csv``: ``path`` as written (relative to the folder), label, split or None."""

    path: str
    label: str
    split: str | None = None


def read_labels(root, *, allow_outside: bool = False) -> list[LabelEntry]:
    """Parse ``root/labels.csv``; a malformed file raises ValueError ``"FILE:LINE: problem"``.

    Each path is resolved against ``root``; an absolute path, or one resolving outside ``root``
    (``../x.mp4``, a symlink leading out), is refused unless ``allow_outside``. Two rows resolving to
    the same file (``a.mp4``, ``./a.mp4``, ``sub/../a.mp4``) are refused whether their labels agree or not.
    """
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
    folder = Path(root).resolve()
    entries, seen = [], {}
    for line, row in rows[1:]:
        if len(row) != len(header):
            raise ValueError(f"{file}:{line}: expected {len(header)} fields ({','.join(header)}), got {len(row)}")
        cells = dict(zip(header, (cell.strip() for cell in row)))
        if not cells["path"] or not cells["label"]:
            raise ValueError(f"{file}:{line}: empty path or label")
        resolved = _resolve_row(file, line, folder, cells["path"], allow_outside)
        if resolved in seen:
            first_line, first_path = seen[resolved]
            spelled = "" if first_path == cells["path"] else f" as {first_path!r}"
            raise ValueError(f"{file}:{line}: duplicate path {cells['path']!r} (first on line {first_line}{spelled})")
        seen[resolved] = line, cells["path"]
        entries.append(LabelEntry(cells["path"], cells["label"], cells.get("split") or None))
    if not entries:
        raise ValueError(f"{file}: no rows after the header")
    return entries


def _resolve_row(file: Path, line: int, folder: Path, path: str, allow_outside: bool) -> Path:
    """The file a row names, resolved against the dataset ``folder``; ValueError for a path outside it."""
    if Path(path).is_absolute() and not allow_outside:
        raise ValueError(f"{file}:{line}: absolute path {path!r} refused: paths are relative to {folder} "
                         "(allow paths outside the folder with --allow-outside)")
    resolved = (folder / path).resolve()
    if not allow_outside and not resolved.is_relative_to(folder):
        raise ValueError(f"{file}:{line}: path {path!r} leads outside {folder} (to {resolved}); "
                         "allow paths outside the folder with --allow-outside")
    return resolved


def class_names(entries: Iterable[LabelEntry]) -> list[str]:
    """Sorted distinct labels: the class index of a label is its position here."""
    return sorted({e.label for e in entries})


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/avgn_fast/clips`` (``~/.cache`` when unset or relative, as the XDG spec says)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "avgn_fast" / "clips"


def default_cache_dir(preferred, log: Callable[[str], None] = print) -> Path:
    """``preferred`` when it can be created and written, else ``user_cache_dir()`` with one ``log`` line.

    Writability is tried by creating a file: permission bits say nothing to root, nor of read-only
    mounts. ValueError when neither folder can be written.
    """
    preferred = Path(preferred)
    problem = _unwritable(preferred)
    if problem is None:
        return preferred
    fallback = user_cache_dir()
    if (second := _unwritable(fallback)) is not None:
        raise ValueError(f"no writable decoded-clip cache: {preferred} ({problem}), {fallback} ({second}); "
                         "choose one with --cache-dir")
    log(f"cannot write the decoded-clip cache in {preferred} ({problem}); using {fallback}")
    return fallback


def _unwritable(folder: Path) -> str | None:
    """Why files cannot be created in ``folder`` (created if missing), or None when they can."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe.{os.getpid()}.{threading.get_ident()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


class ClipCache:
    """Decoded clips, and the errors of files that deterministically fail, as one torch file per video.

    An entry's key covers the file's resolved path, size, mtime and a hash of its first and last
    64 KiB, the decode parameters, the backend and ``_CACHE_VERSION``, so a changed file, other
    parameters or a new decoded form miss. Entries are checked when read (version, key, fields,
    dtypes, shapes against ``params``): a truncated, foreign or damaged entry reads as a miss and is
    overwritten by the next ``store``. Writes go to a temporary file of this process and thread,
    synced, then renamed over the entry, so concurrent readers never see half an entry.
    """

    def __init__(self, folder, params: DecodeParams, backend: str):
        self.folder = Path(folder)
        self.params = params
        self.backend = backend
        self._warned = False

    def key(self, path) -> str | None:
        """The entry key of ``path`` as it is now; None when the file cannot be read (nothing to cache)."""
        try:
            fingerprint = _fingerprint(path)
        except OSError:
            return None
        parts = [str(Path(path).resolve()), *fingerprint, self.backend, _CACHE_VERSION, asdict(self.params)]
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def entry_file(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.pt"

    def load(self, path, key: str) -> Clip | DecodeError | None:
        """The stored result for ``path`` under ``key``; None when absent or not a valid entry."""
        file = self.entry_file(key)
        if not file.is_file():
            return None
        try:
            payload = torch.load(file, map_location="cpu", weights_only=True)
        except Exception:  # any damage (torn zip, NUL bytes, JSON, pickle) is a miss: torch raises many types
            return None
        if not isinstance(payload, dict) or payload.get("version") != _CACHE_VERSION or payload.get("key") != key:
            return None
        if set(payload) == {"version", "key", "error"}:
            error = payload["error"]
            return DecodeError(path, error) if isinstance(error, str) and error else None
        if set(payload) != {"version", "key", "clip"} or not isinstance(payload["clip"], dict):
            return None
        return self._clip(payload["clip"], path)

    def store(self, path, key: str | None, result: Clip | DecodeError) -> bool:
        """Save ``result`` of ``path``, decoded when the file had ``key``; True when written.

        Nothing is written for a transient error (it says nothing of the file), or when the file is
        unreadable or changed since ``key`` (the result may not match either version). A write that
        fails (full disk, read-only folder) warns once and leaves decoding to go on without the cache.
        """
        if key is None or (isinstance(result, DecodeError) and result.transient) or self.key(path) != key:
            return False
        if isinstance(result, DecodeError):
            payload = {"version": _CACHE_VERSION, "key": key, "error": result.problem}
        else:
            clip = {name: getattr(result, name) for name in _STORED_FIELDS}
            clip["source_size"] = list(result.source_size)
            payload = {"version": _CACHE_VERSION, "key": key, "clip": clip}
        file = self.entry_file(key)
        try:
            _write_atomic(file, payload)
        except OSError as e:
            if not self._warned:
                warnings.warn(f"{file}: cannot write the decoded-clip cache ({e}); decoding without it",
                              stacklevel=2)
                self._warned = True
            return False
        return True

    def _clip(self, stored: dict, path) -> Clip | None:
        """The Clip of a stored field dict, or None when a field is missing, extra, or of the wrong type/shape."""
        if set(stored) != set(_STORED_FIELDS):
            return None
        p = self.params
        t = p.num_frames
        checks = {
            "frames": lambda x: _is_tensor(x, torch.uint8, (t, 3, p.size, p.size)),
            "mel": lambda x: _is_tensor(x, torch.float32, (t, p.n_mels, p.stft.n_steps)),
            "audio_present": lambda x: type(x) is bool,
            "duration": _is_real,
            "fps": _is_real,
            "source_size": lambda x: (isinstance(x, list) and len(x) == 2
                                      and all(type(v) is int and v > 0 for v in x)),
            "resize_shorter": lambda x: type(x) is int and x == p.resize_shorter,
            "frame_times": lambda x: x is None or _is_tensor(x, torch.float64, (t,)),
            "notes": lambda x: isinstance(x, list) and all(isinstance(note, str) for note in x),
        }
        if not all(check(stored[name]) for name, check in checks.items()):
            return None
        try:  # fields without a check above are left to the Clip's own validation
            return Clip(**{**stored, "source_size": tuple(stored["source_size"])}, path=str(path))
        except (TypeError, ValueError):
            return None


def _is_tensor(x, dtype: torch.dtype, shape: tuple[int, ...]) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == dtype and tuple(x.shape) == shape


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _fingerprint(path) -> tuple[int, int, str]:
    """(size, mtime_ns, blake2b of the first and last 64 KiB) of the file, read through one descriptor."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        digest = hashlib.blake2b(f.read(_FINGERPRINT_SPAN), digest_size=16)
        if st.st_size > _FINGERPRINT_SPAN:
            f.seek(max(_FINGERPRINT_SPAN, st.st_size - _FINGERPRINT_SPAN))
            digest.update(f.read(_FINGERPRINT_SPAN))
    return st.st_size, st.st_mtime_ns, digest.hexdigest()


def _write_atomic(file: Path, payload) -> None:
    """``torch.save`` to a temporary file unique to this process and thread, fsync, rename over ``file``."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    # 0o666 lets the umask decide who may read a shared cache; O_NOFOLLOW never writes through a planted link
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class FolderDataset(torch.utils.data.Dataset):
    """``(Clip, label_index)`` per row of ``root/labels.csv`` (optionally one ``split``).

    With ``cache_dir``, each decoded clip (or the error of a file that deterministically failed) is
    kept there by a ``ClipCache``, so later epochs read it instead of decoding; a changed file is
    decoded again, and a damaged entry is decoded again and overwritten. Without ``cache_dir`` every
    access decodes. A file that cannot be decoded raises its ``DecodeError`` from ``__getitem__`` and
    is recorded in ``errors``; ``decode_all`` decodes (and caches) everything up front and drops the
    failures from the dataset. ``decodes`` counts the files this process actually decoded; ``errors``
    likewise holds this process's failures only. ``allow_outside`` is ``read_labels``'.
    """

    def __init__(self, root, config: AVGNConfig, *, split: str | None = None, cache_dir=None,
                 backend: str = "pyav", allow_outside: bool = False):
        self.root = Path(root)
        all_entries = read_labels(self.root, allow_outside=allow_outside)
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
        self.cache = None if cache_dir is None else ClipCache(cache_dir, self.params, backend)
        self.errors: list[DecodeError] = []
        self.decodes = 0

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[Clip, int]:
        entry = self.entries[i]
        key, result = self._cached(entry)
        if result is None:
            result = self._decode([entry], [key])[0]
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
            key, cached = self._cached(entry)
            if cached is None:
                todo.append((entry, key))
            else:
                failed[entry] = cached if isinstance(cached, DecodeError) else None
        batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
        for batch in progress(batches) if progress is not None else batches:
            entries = [entry for entry, _ in batch]
            for entry, result in zip(entries, self._decode(entries, [key for _, key in batch])):
                failed[entry] = result if isinstance(result, DecodeError) else None
        errors = [failed[e] for e in self.entries if failed[e] is not None]
        self.entries = [e for e in self.entries if failed[e] is None]
        self.errors.extend(e for e in errors if all(str(e) != str(x) for x in self.errors))
        return errors

    def _cached(self, entry: LabelEntry) -> tuple[str | None, Clip | DecodeError | None]:
        """(cache key, cached result): both None without a cache; the result None on a miss."""
        if self.cache is None:
            return None, None
        path = self.path_of(entry)
        key = self.cache.key(path)
        return key, None if key is None else self.cache.load(path, key)

    def _decode(self, entries: list[LabelEntry], keys: list[str | None]) -> list[Clip | DecodeError]:
        """Decode ``entries`` and store each result under the key its file had before decoding."""
        results = decode_many([self.path_of(e) for e in entries], self.config, self.backend)
        results = [r if isinstance(r, DecodeError) else replace(r, frames=r.frames.cpu(), mel=r.mel.cpu())
                   for r in results]
        self.decodes += len(entries)
        if self.cache is not None:
            for entry, key, result in zip(entries, keys, results):
                self.cache.store(self.path_of(entry), key, result)
        return results


def decoded_split(data, config: AVGNConfig, split: str | None, *, cache_dir=None, class_names=None,
                  progress: bool = False, log: Callable[[str], None] = print,
                  allow_outside: bool = False) -> FolderDataset:
    """``FolderDataset`` of ``split`` (None: every row) with every file decoded into the cache; files that fail
    are dropped, each with a ``log`` line naming it. ValueError when the folder's classes differ from
    ``class_names`` (a checkpoint's) or when no file of the split decodes. ``allow_outside`` is ``read_labels``'."""
    from tqdm import tqdm

    dataset = FolderDataset(data, config, split=split, cache_dir=cache_dir, allow_outside=allow_outside)
    if class_names is not None and dataset.classes != list(class_names):
        raise ValueError(f"{data}: classes {dataset.classes} differ from the checkpoint's {list(class_names)}")
    desc = "decode" if split is None else f"decode {split}"
    for error in dataset.decode_all(progress=lambda batches: tqdm(batches, desc=desc, unit="batch",
                                                                  disable=not progress)):
        log(f"skipping {error}")
    if not len(dataset):
        raise ValueError(f"{data}: no decodable videos in split {split!r}")
    return dataset
