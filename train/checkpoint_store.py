"""Where checkpoints live and how a save is committed: a local directory or an S3 prefix, behind one interface.

- **Local** (a path): every rank writes into ``step-XXXXXXXX.tmp``; once all ranks finished, rank 0 renames it to
  ``step-XXXXXXXX`` (atomic on a POSIX file system). A directory without ``.tmp`` is always complete.
- **S3** (``s3://bucket/prefix``): objects cannot be renamed, so the commit is DCP's own ``.metadata`` object. Its
  coordinator writes it only after every rank's files were uploaded (a PUT is atomic), so ``step-XXXXXXXX/`` counts
  as a checkpoint only once ``step-XXXXXXXX/.metadata`` exists. Rank files go up as multipart uploads from a spooled
  temporary file (:class:`S3Writer`); reads are ranged GETs with read-ahead (:class:`S3Reader`), so a rank loading
  another layout fetches only its slices.

The manager that saves, commits and prunes through a store is :class:`train.checkpoint.CheckpointManager`.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from torch.distributed.checkpoint.filesystem import FileSystemBase, FileSystemReader, FileSystemWriter

from storage import S3Options, S3Storage

__all__ = ["INFO_FILE", "METADATA_FILE", "STEP_DIR", "CheckpointStore", "LocalCheckpointStore", "S3CheckpointStore",
           "S3FileSystem", "S3Reader", "S3Writer", "open_checkpoint_store", "split_location"]

STEP_DIR = re.compile(r"^step-(\d{8})$")
INFO_FILE = "checkpoint.json"
METADATA_FILE = ".metadata"


class CheckpointStore(Protocol):
    """The checkpoints of one stage: a local directory or an S3 prefix."""

    url: str

    def location(self, step: int) -> str: ...

    def committed_steps(self) -> list[int]: ...

    def begin(self, step: int) -> None: ...

    def writer(self, step: int) -> FileSystemWriter: ...

    def reader(self, step: int) -> FileSystemReader: ...

    def write_info(self, step: int, info: dict[str, Any]) -> None: ...

    def read_info(self, step: int) -> dict[str, Any]: ...

    def commit(self, step: int) -> None: ...

    def remove(self, step: int) -> None: ...

    def remove_leftovers(self, keep: int | None) -> None: ...


class LocalCheckpointStore:
    """``step-XXXXXXXX`` directories under ``directory``; written as ``.tmp`` and committed by a rename."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.url = str(self.directory)

    def path(self, step: int) -> Path:
        return self.directory / f"step-{step:08d}"

    def _staging(self, step: int) -> Path:
        return self.directory / f"step-{step:08d}.tmp"

    def location(self, step: int) -> str:
        return str(self.path(step))

    def committed_steps(self) -> list[int]:
        if not self.directory.exists():
            return []
        found = (STEP_DIR.match(p.name) for p in self.directory.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def begin(self, step: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self._staging(step), ignore_errors=True)

    def writer(self, step: int) -> FileSystemWriter:
        return FileSystemWriter(self._staging(step))

    def reader(self, step: int) -> FileSystemReader:
        return FileSystemReader(self.path(step))

    def write_info(self, step: int, info: dict[str, Any]) -> None:
        staging = self._staging(step)
        staging.mkdir(parents=True, exist_ok=True)
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")

    def read_info(self, step: int) -> dict[str, Any]:
        path = self.path(step) / INFO_FILE
        return json.loads(path.read_text()) if path.exists() else {}

    def commit(self, step: int) -> None:
        shutil.rmtree(self.path(step), ignore_errors=True)
        self._staging(step).rename(self.path(step))  # the commit: atomic on a POSIX file system

    def remove(self, step: int) -> None:
        shutil.rmtree(self.path(step), ignore_errors=True)

    def remove_leftovers(self, keep: int | None) -> None:
        for leftover in self.directory.glob("step-*.tmp"):
            if keep is None or leftover != self._staging(keep):
                shutil.rmtree(leftover, ignore_errors=True)


class S3CheckpointStore:
    """``step-XXXXXXXX/`` prefixes under an S3 URL; a checkpoint is committed once its ``.metadata`` exists."""

    def __init__(self, url: str, options: S3Options | None = None):
        self.url = url.rstrip("/")
        self.storage = S3Storage(self.url, options)

    def _prefix(self, step: int) -> str:
        return f"step-{step:08d}"

    def location(self, step: int) -> str:
        return f"{self.url}/{self._prefix(step)}"

    def _steps_with_objects(self) -> dict[int, list[str]]:
        steps: dict[int, list[str]] = {}
        for key in self.storage.list(""):
            head = key.split("/", 1)[0]
            match = STEP_DIR.match(head)
            if match:
                steps.setdefault(int(match.group(1)), []).append(key)
        return steps

    def committed_steps(self) -> list[int]:
        return sorted(step for step, keys in self._steps_with_objects().items()
                      if f"{self._prefix(step)}/{METADATA_FILE}" in keys)

    def begin(self, step: int) -> None:
        # Files of an earlier, interrupted save of the same step would otherwise mix with this one's.
        self.storage.delete(self.storage.list(self._prefix(step) + "/"))

    def writer(self, step: int) -> FileSystemWriter:
        return S3Writer(self.storage, self._prefix(step))

    def reader(self, step: int) -> FileSystemReader:
        return S3Reader(self.storage, self._prefix(step))

    def write_info(self, step: int, info: dict[str, Any]) -> None:
        self.storage.write(f"{self._prefix(step)}/{INFO_FILE}", (json.dumps(info, indent=2) + "\n").encode())

    def read_info(self, step: int) -> dict[str, Any]:
        key = f"{self._prefix(step)}/{INFO_FILE}"
        return json.loads(self.storage.read(key)) if self.storage.exists(key) else {}

    def commit(self, step: int) -> None:
        # DCP's coordinator wrote .metadata after every rank's upload: that PUT was the commit.
        if not self.storage.exists(f"{self._prefix(step)}/{METADATA_FILE}"):
            raise RuntimeError(f"{self.location(step)} has no {METADATA_FILE} after its save finished")

    def remove(self, step: int) -> None:
        self.storage.delete(self.storage.list(self._prefix(step) + "/"))

    def remove_leftovers(self, keep: int | None) -> None:
        for step, keys in self._steps_with_objects().items():
            if step != keep and f"{self._prefix(step)}/{METADATA_FILE}" not in keys:
                self.storage.delete(keys)


def open_checkpoint_store(url: str | Path, options: S3Options | None = None) -> CheckpointStore:
    text = str(url)
    if text.startswith("s3://"):
        return S3CheckpointStore(text, options)
    return LocalCheckpointStore(text[len("file://"):] if text.startswith("file://") else text)


def split_location(location: str | Path, options: S3Options | None = None) -> tuple[CheckpointStore, int]:
    """The store holding a checkpoint and its step, from the checkpoint's path or URL."""
    text = str(location).rstrip("/")
    parent, _, name = text.rpartition("/")
    match = STEP_DIR.match(name)
    if not match:
        raise FileNotFoundError(f"{location} is not a checkpoint (its last component must be step-XXXXXXXX)")
    return open_checkpoint_store(parent or ".", options), int(match.group(1))


# --------------------------------------------------------------------------------------------------------------------
# DCP's file-system writer and reader on S3 objects


class _RangedObjectReader(io.RawIOBase):
    """A seekable read-only view of one S3 object through ranged GETs of at least ``block_bytes``: DCP seeks to each
    tensor of a rank file and ``torch.load`` reads it in many small pieces, which one block then serves."""

    def __init__(self, storage: S3Storage, key: str, block_bytes: int):
        self.storage, self.key, self.block_bytes = storage, key, block_bytes
        self.length = storage.size(key)
        self.position = 0
        self.block_start, self.block = 0, b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.length}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer) -> int:
        want = min(len(buffer), self.length - self.position)
        if want <= 0:
            return 0
        offset = self.position - self.block_start
        if not (0 <= offset and offset + want <= len(self.block)):
            fetch = min(max(want, self.block_bytes), self.length - self.position)
            self.block_start, self.block = self.position, self.storage.read_range(self.key, self.position, fetch)
            offset = 0
        got = self.block[offset : offset + want]
        buffer[: len(got)] = got
        self.position += len(got)
        return len(got)


class _UploadOnClose(tempfile.SpooledTemporaryFile):
    """A write stream spooled in memory (then a temporary file) and uploaded as one object when closed."""

    def __init__(self, storage: S3Storage, key: str):
        super().__init__(max_size=64 * 2**20)
        self.storage, self.key = storage, key
        self.upload_on_close = True

    def close(self) -> None:
        # Only the first close uploads (and none after a failed write, see create_stream).
        if self.upload_on_close and not self.closed:
            self.upload_on_close = False
            self.storage.upload(self.key, self)
        super().close()


class S3FileSystem(FileSystemBase):
    """DCP's file-system interface on an S3 prefix; paths are keys relative to ``storage``'s root."""

    READ_AHEAD_BYTES = 8 * 2**20

    def __init__(self, storage: S3Storage):
        self.storage = storage

    @contextmanager
    def create_stream(self, path, mode: str):
        if "w" in mode:
            stream = _UploadOnClose(self.storage, str(path))
            try:
                yield stream
            except BaseException:
                stream.upload_on_close = False  # never upload a half-written file
                stream.close()
                raise
            stream.close()
        else:
            with _RangedObjectReader(self.storage, str(path), self.READ_AHEAD_BYTES) as stream:
                yield stream

    def concat_path(self, path, suffix: str) -> str:
        return f"{path}/{suffix}" if str(path) else suffix

    def rename(self, path, new_path) -> None:
        self.storage.copy(str(path), str(new_path))
        self.storage.delete([str(path)])

    def init_path(self, path) -> str:
        return str(path)

    def mkdir(self, path) -> None:
        """S3 has no directories."""

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return str(checkpoint_id).startswith("s3://")

    def exists(self, path) -> bool:
        return self.storage.exists(str(path))

    def rm_file(self, path) -> None:
        self.storage.delete([str(path)])


class S3Writer(FileSystemWriter):
    """DCP's FileSystemWriter writing one object per rank under ``prefix`` of ``storage``."""

    def __init__(self, storage: S3Storage, prefix: str):
        # Files are uploaded whole when closed: there is nothing to fsync (and os.sync() would flush the node).
        super().__init__(prefix, sync_files=False)
        self.fs = S3FileSystem(storage)
        self.path = prefix


class S3Reader(FileSystemReader):
    """DCP's FileSystemReader reading the objects under ``prefix`` of ``storage`` with ranged GETs."""

    def __init__(self, storage: S3Storage, prefix: str):
        super().__init__(prefix)
        self.fs = S3FileSystem(storage)
        self.path = prefix
