"""Checkpoints: ``torch.distributed.checkpoint`` directories on a local path or S3, committed atomically, keep-last-k,
optionally written in the background.

The commit is what makes a crash during a save harmless:

- **Local** (a path): every rank writes into ``step-XXXXXXXX.tmp``; once all ranks finished, rank 0 renames it to
  ``step-XXXXXXXX`` (atomic on a POSIX file system). A directory without ``.tmp`` is always complete.
- **S3** (``s3://bucket/prefix``): objects cannot be renamed, so the commit is DCP's own ``.metadata`` object. Its
  coordinator writes it only after every rank's files were uploaded (a PUT is atomic), so ``step-XXXXXXXX/`` counts
  as a checkpoint only once ``step-XXXXXXXX/.metadata`` exists. Rank files go up as multipart uploads from a spooled
  temporary file; reads are ranged GETs with read-ahead, so a rank loading another layout fetches only its slices.

Leftovers of an interrupted save are removed at the next commit.

**Asynchronous saves** (``checkpoint.async_save``): the state is copied to host memory at the step boundary (DCP's
staging, so training may change the parameters right away), then written by a background thread that talks to the
other ranks over a process group of its own (gloo), never interleaving with the training collectives. Rank 0
commits when its write finishes: DCP's coordinator finishes only after every rank's write, so that is the moment
the checkpoint is complete. One save is in flight at most; the next save, the end of a stage and leaving all wait for
it, and its errors surface there.

Each checkpoint carries ``checkpoint.json`` (stage, step, RoPE base, sequence length, layout and the run's resolved
configuration), so evaluation and conversion know what they hold without the run directory.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import tempfile
import threading
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.filesystem import FileSystemBase, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from storage import S3Options, S3Storage

logger = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step-(\d{8})$")
INFO_FILE = "checkpoint.json"
METADATA_FILE = ".metadata"


class ModelState(Stateful):
    """The full model (trainable and frozen parameters, persistent buffers) under its module names.

    Expert-parallel shards (modules with an ``expert_offset``) are saved as DTensors sharded over the ``ep`` dim of
    ``expert_mesh``: the checkpoint holds every expert once, at its global index, and loads into any expert-parallel
    degree (or none).

    Args:
        model: The model.
        expert_mesh: The ``(pp, expert_data, ep)`` mesh when experts are sharded, else None.
    """

    def __init__(self, model: nn.Module, expert_mesh: DeviceMesh | None = None):
        self.model = model
        self.expert_mesh = expert_mesh

    def _expert_shards(self) -> dict[str, torch.Tensor]:
        if self.expert_mesh is None:
            return {}
        return {f"{module_name}.{name}": param for module_name, module in self.model.named_modules()
                if hasattr(module, "expert_offset") for name, param in module.named_parameters(recurse=False)}

    def state_dict(self) -> dict[str, Any]:
        state = get_model_state_dict(self.model)
        for name, param in self._expert_shards().items():
            # Shares the parameter's storage: loading in place fills the parameter directly.
            state[name] = DTensor.from_local(param.data, self.expert_mesh, [Replicate(), Replicate(), Shard(0)],
                                             run_check=False)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        shards = self._expert_shards()
        for name, param in shards.items():
            loaded = state_dict.pop(name)
            local = loaded.to_local() if isinstance(loaded, DTensor) else loaded
            if local.data_ptr() != param.data_ptr():
                param.data.copy_(local)
        set_model_state_dict(self.model, state_dict, options=StateDictOptions(strict=not shards))


class RNGState(Stateful):
    """The torch CPU generator and, on a GPU, the CUDA generator of this rank's device.

    Args:
        device: The rank's device; its generator is saved as well when it is a CUDA device.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def state_dict(self) -> dict[str, Any]:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["cpu"])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state_dict["cuda"], self.device)


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier(group: dist.ProcessGroup | None = None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


# --------------------------------------------------------------------------------------------------------------------
# Where checkpoints live


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


# --------------------------------------------------------------------------------------------------------------------
# Saving, committing, loading


class CheckpointManager:
    """Saves, commits, prunes and finds the checkpoints of one stage.

    Args:
        store: Where they live (:func:`open_checkpoint_store`).
        keep_last: Committed checkpoints kept; older ones are deleted at each commit.
        async_group: A process group for background saves (gloo, created by every rank), or None to save
            synchronously.
    """

    def __init__(self, store: CheckpointStore | str | Path, keep_last: int,
                 async_group: dist.ProcessGroup | None = None):
        self.store = store if not isinstance(store, (str, Path)) else open_checkpoint_store(store)
        self.keep_last = keep_last
        self.async_group = async_group
        self._pending: tuple[int, Future] | None = None
        self._commit_error: BaseException | None = None
        # Set by rank 0's background commit when it has finished (a future's callbacks run after its waiters wake).
        self._committed = threading.Event()

    @property
    def directory(self) -> Path:
        """The local directory of a local store."""
        return Path(self.store.url)

    def path(self, step: int) -> Path:
        """The local directory of a checkpoint (local stores)."""
        return Path(self.store.location(step))

    def location(self, step: int) -> str:
        return self.store.location(step)

    def committed_steps(self) -> list[int]:
        return self.store.committed_steps()

    def latest_step(self) -> int | None:
        steps = self.committed_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: dict[str, Any], info: dict[str, Any] | None = None,
             blocking: bool = True) -> str:
        """Write ``state`` (tensors and Stateful objects) as the checkpoint of ``step`` and commit it.

        With an ``async_group`` and ``blocking=False`` this returns once the state is staged in host memory; the
        write and the commit finish in the background (:meth:`wait`). Returns the checkpoint's location.
        """
        self.wait()
        group = self.async_group
        if _is_rank0():
            self.store.begin(step)
            if info is not None:
                self.store.write_info(step, info)
        _barrier(group)
        writer = self.store.writer(step)
        if group is None or blocking:
            dcp.save(state, storage_writer=writer, process_group=group)
            _barrier(group)
            if _is_rank0():
                self._commit(step)
            _barrier(group)
            return self.location(step)
        self._committed.clear()
        future = dcp.async_save(state, storage_writer=writer, process_group=group)
        if _is_rank0():
            # Rank 0's save ends with the coordinator's .metadata, written after every rank's files: commit then.
            future.add_done_callback(lambda done: self._commit_in_background(step, done))
        self._pending = (step, future)
        return self.location(step)

    def _commit_in_background(self, step: int, done: Future) -> None:
        try:
            if done.exception() is None:
                self._commit(step)
        except BaseException as error:  # raised by wait(): a callback's exception would only be logged
            self._commit_error = error
        finally:
            self._committed.set()

    def _commit(self, step: int) -> None:
        self.store.commit(step)
        for old in self.store.committed_steps()[: -self.keep_last]:
            self.store.remove(old)
        self.store.remove_leftovers(keep=None)
        logger.info("checkpoint %s committed", self.location(step))

    @property
    def saving(self) -> int | None:
        """The step of the save in flight, if any."""
        return self._pending[0] if self._pending else None

    def wait(self) -> None:
        """Finish the save in flight (write and commit) on every rank; re-raises its error."""
        if self._pending is None:
            return
        step, future = self._pending
        self._pending = None
        future.result()  # the write's error, if any
        if _is_rank0():
            self._committed.wait()
        # All ranks wait here for rank 0's commit, so every rank then sees the checkpoint committed.
        _barrier(self.async_group)
        error, self._commit_error = self._commit_error, None
        if error is not None:
            raise RuntimeError(f"committing checkpoint {self.location(step)} failed: {error}") from error

    def abandon(self) -> None:
        """On an error: let the save in flight finish (it holds a good step) without waiting for the other ranks
        at a barrier, which a rank-local error would never reach; its own failure is logged, not raised."""
        if self._pending is None:
            return
        step, future = self._pending
        self._pending = None
        try:
            future.result()
            if _is_rank0():
                self._committed.wait()
        except Exception as error:
            logger.error("checkpoint %s was not completed: %s", self.location(step), error)

    def load(self, step: int, state: dict[str, Any]) -> None:
        """Fill ``state`` in place from the committed checkpoint of ``step``."""
        dcp.load(state, storage_reader=self.store.reader(step))

    def info(self, step: int) -> dict[str, Any]:
        """The ``checkpoint.json`` of a committed checkpoint."""
        return self.store.read_info(step)


def _split_location(location: str | Path, options: S3Options | None = None) -> tuple[CheckpointStore, int]:
    """The store holding a checkpoint and its step, from the checkpoint's path or URL."""
    text = str(location).rstrip("/")
    parent, _, name = text.rpartition("/")
    match = STEP_DIR.match(name)
    if not match:
        raise FileNotFoundError(f"{location} is not a checkpoint (its last component must be step-XXXXXXXX)")
    return open_checkpoint_store(parent or ".", options), int(match.group(1))


def load_checkpoint(location: str | Path, state: dict[str, Any], options: S3Options | None = None) -> None:
    """Load the keys of ``state`` from a committed checkpoint: a local ``step-XXXXXXXX`` directory or its S3 URL
    (other keys in it are ignored)."""
    text = str(location)
    if text.startswith("s3://"):
        store, step = _split_location(text, options)
        if step not in store.committed_steps():
            raise FileNotFoundError(f"{location} is not a committed checkpoint (no {METADATA_FILE})")
        dcp.load(state, storage_reader=store.reader(step))
        return
    if not (Path(text) / METADATA_FILE).exists():
        raise FileNotFoundError(f"{location} is not a committed checkpoint (no {METADATA_FILE})")
    dcp.load(state, checkpoint_id=text)


def read_checkpoint_info(location: str | Path, options: S3Options | None = None) -> dict[str, Any]:
    """The ``checkpoint.json`` of a checkpoint (``{}`` for checkpoints written before it existed)."""
    store, step = _split_location(location, options)
    return store.read_info(step)
