"""Reading Hugging Face safetensors checkpoints: through ``*.index.json`` when sharded, tensor by tensor.

A checkpoint directory is read the way ``from_pretrained`` reads it: ``model.safetensors.index.json`` (or another
``*.safetensors.index.json``) names the file of every tensor, and only those files are opened; without an index the
directory must hold one ``model.safetensors`` (or exactly one ``*.safetensors`` file). Stray ``.safetensors`` files
next to an index (consolidated copies, adapters, older shards) are therefore never read.

Tensors are opened lazily (``safe_open``): a rank reads only the tensors it holds, and a stacked expert tensor can be
read one slice of experts at a time, so no process materializes a checkpoint it does not need.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

__all__ = ["SafetensorsCheckpoint"]

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _index_file(directory: Path) -> Path | None:
    preferred = directory / "model.safetensors.index.json"
    if preferred.exists():
        return preferred
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ValueError(f"{directory} holds several safetensors indexes ({', '.join(p.name for p in indexes)}); "
                         "keep the one of the checkpoint to read.")
    return indexes[0] if indexes else None


class SafetensorsCheckpoint:
    """The tensors of a safetensors file or checkpoint directory, by name, read on demand.

    Args:
        path: A ``.safetensors`` file, or a directory holding an index and its shards, or one safetensors file.

    Raises:
        FileNotFoundError: No safetensors file, or a shard the index names is absent.
        ValueError: Several candidate files and no index, or a tensor in two shards.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._files: dict[str, Path] = {}  # tensor name -> file
        if self.path.is_dir():
            index = _index_file(self.path)
            if index is not None:
                weight_map = json.loads(index.read_text())["weight_map"]
                for name, filename in weight_map.items():
                    file = self.path / filename
                    self._files[name] = file
                missing = sorted({f for f in self._files.values() if not f.exists()})
                if missing:
                    raise FileNotFoundError(f"{index} names {missing[0].name}, which is not in {self.path}")
                self._verify_index(index)
                return
            files = [self.path / "model.safetensors"] if (self.path / "model.safetensors").exists() else sorted(
                self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no .safetensors files in {self.path}")
            if len(files) > 1:
                raise ValueError(f"{self.path} holds {len(files)} .safetensors files and no "
                                 "model.safetensors.index.json saying which belong to the checkpoint")
        else:
            if not self.path.exists():
                raise FileNotFoundError(f"no such safetensors file: {self.path}")
            files = [self.path]
        for file in files:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open handles are not mappings)
                    self._files[name] = file

    def _verify_index(self, index: Path) -> None:
        """Every tensor the index names is in the shard it names (a stale index fails here, not mid-load)."""
        by_file: dict[Path, set[str]] = {}
        for name, file in self._files.items():
            by_file.setdefault(file, set()).add(name)
        for file, names in by_file.items():
            with safe_open(file, framework="pt") as handle:
                absent = names - set(handle.keys())
            if absent:
                raise ValueError(f"{index.name} puts {sorted(absent)[0]!r} in {file.name}, which does not hold it")

    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def __len__(self) -> int:
        return len(self._files)

    def _open(self, name: str):
        if name not in self._files:
            raise KeyError(f"tensor {name!r} is not in {self.path}")
        return safe_open(self._files[name], framework="pt")

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the file header (no data read)."""
        with self._open(name) as handle:
            return tuple(handle.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        with self._open(name) as handle:
            return _DTYPES[handle.get_slice(name).get_dtype()]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape (headers only), one open per file."""
        out: dict[str, tuple[int, ...]] = {}
        by_file: dict[Path, list[str]] = {}
        for name, file in self._files.items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            with safe_open(file, framework="pt") as handle:
                out.update({n: tuple(handle.get_slice(n).get_shape()) for n in names})
        return out

    def get(self, name: str) -> torch.Tensor:
        """One whole tensor."""
        with self._open(name) as handle:
            return handle.get_tensor(name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor's first dimension (e.g. one rank's experts of a stacked expert tensor);
        only those bytes are read."""
        with self._open(name) as handle:
            return handle.get_slice(name)[start:stop]

    def tensors(self, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for ``names`` (default: all), each file opened once."""
        wanted = self.keys() if names is None else names
        by_file: dict[Path, list[str]] = {}
        for name in wanted:
            if name not in self._files:
                raise KeyError(f"tensor {name!r} is not in {self.path}")
            by_file.setdefault(self._files[name], []).append(name)
        with ExitStack() as stack:
            for file, group in by_file.items():
                handle = stack.enter_context(safe_open(file, framework="pt"))
                for name in group:
                    yield name, handle.get_tensor(name)

    def load_all(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors())
