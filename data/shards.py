"""Webdataset tar shards as an indexed list of samples, read with ranged requests.

A sample is the group of tar members sharing a key (``<key>.json``, ``<key>.0.png``, ...). Its position in a source
is its rank in shard order, then in tar order. When the manifest gives each shard's sample count
(``shard_samples``), nothing is read up front: a shard's member offsets are loaded on the first draw that lands in
it, from its small sidecar index (``<shard><index_suffix>``, written by ``data.prepare`` and ``data.synthetic``) or,
without one, from one read of the shard; so starting (or resuming) costs the same on a corpus of any size.
Otherwise every shard is read once at the first use to count and index its samples.
"""

from __future__ import annotations

import bisect
import collections
import io
import itertools
import json
import logging
import tarfile
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from data.formats import SampleError
from storage import Storage


def is_megatron(entry: dict) -> bool:
    """Whether a manifest source entry is a Megatron indexed dataset (token ids in ``.bin`` + ``.idx``,
    data/megatron.py) rather than webdataset shards."""
    return isinstance(entry, dict) and entry.get("format") == "megatron"


def source_files(entry: dict) -> list[str]:
    """The data files a manifest source entry lists: its training shards, or a Megatron corpus's two files."""
    if is_megatron(entry):
        return [f"{entry['prefix']}.bin", f"{entry['prefix']}.idx"]
    return list(entry["shards"])

logger = logging.getLogger(__name__)
INDEX_SUFFIX = ".idx.json"
# Shard indexes read at a time when draws land in several shards not indexed yet (at a start or resume, most of
# them): small requests, whose latency, not bandwidth, is the cost.
INDEX_READS_AT_ONCE = 16
Members = dict[str, tuple[int, int]]  # member extension -> (offset, size) in the shard


@dataclass
class RawSample:
    source: str
    shard: str
    key: str
    members: dict[str, bytes]


def shard_members(data: bytes) -> list[tuple[str, Members]]:
    """The samples of a tar shard in tar order: ``(key, {ext: (offset, size)})``."""
    groups: dict[str, Members] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar.getmembers():
            if info.isfile():
                key, _, ext = Path(info.name).name.partition(".")
                groups.setdefault(key, {})[ext] = (info.offset_data, info.size)
    return list(groups.items())


def shards_to_index(sources: dict[str, ShardSource], keys: Iterable[tuple]) -> list[tuple[str, int]]:
    """(source name, shard) of every shard that draws ``keys`` (``(source name, position, ...)``) land in whose
    index is not loaded yet: what to read at once ahead of them (:data:`INDEX_READS_AT_ONCE`)."""
    positions = collections.defaultdict(list)
    for key in keys:
        positions[key[0]].append(key[1])
    return [(name, shard) for name, where in positions.items() for shard in sources[name].unindexed_shards(where)]


def index_bytes(data: bytes) -> bytes:
    """The sidecar index of a shard (its :func:`shard_members` as JSON)."""
    return json.dumps([[key, {ext: list(span) for ext, span in members.items()}]
                       for key, members in shard_members(data)], separators=(",", ":")).encode("utf-8")


class ShardSource:
    """One named source: every sample of its tar shards, addressable by position.

    Samples are fetched with ranged reads of just their members (one request per sample: a sample's members lie
    together in its shard), locally or on S3. A shard that does not exist fails by name, or, with
    ``skip_missing``, is logged and recorded in ``missing_shards``: left out of an eagerly built index, or, when
    the shard counts come from the manifest, its draws become :class:`SampleError` (skipped and counted like
    corrupt samples).

    Args:
        name: Source name (for messages).
        storage: Where the shards are.
        shards: Shard keys, in order.
        skip_missing: Skip missing shards instead of failing.
        threads: Shards read at a time when indexing eagerly.
        shard_samples: Samples per shard (from the manifest): index lazily, shard by shard.
        index_suffix: Suffix of the shards' sidecar indexes ("" : none; read the shard instead).
    """

    def __init__(self, name: str, storage: Storage, shards: list[str], skip_missing: bool = False,
                 threads: int = 1, shard_samples: list[int] | None = None, index_suffix: str = ""):
        self.name = name
        self.storage = storage
        self.shards = list(shards)
        self.skip_missing = skip_missing
        self.threads = max(1, threads)
        self.index_suffix = index_suffix
        self.missing_shards: list[str] = []
        self._index: list[tuple[int, str, Members]] | None = None
        self.lazy = shard_samples is not None and len(shard_samples) == len(self.shards)
        self._starts = list(itertools.accumulate([0, *map(int, shard_samples)])) if self.lazy else []
        self._shard_index: dict[int, list[tuple[str, Members]] | None] = {}
        self._locks: dict[int, threading.Lock] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        # Picklable for worker processes: the index travels, the locks are made anew.
        return {**self.__dict__, "_lock": None, "_locks": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ----- eager: every shard read once ---------------------------------------------------------------------

    def _read_shard(self, shard: str) -> bytes | None:
        try:
            return self.storage.read(shard)
        except FileNotFoundError:
            if not self.skip_missing:
                raise FileNotFoundError(f"source '{self.name}': shard {self.storage.url}/{shard} is missing "
                                        f"(data.skip_missing_shards=true skips it)") from None
            self.missing_shards.append(shard)
            logger.warning("source '%s': shard %s/%s is missing; skipped", self.name, self.storage.url, shard)
            return None

    def _build_index(self) -> list[tuple[int, str, Members]]:
        index = []
        with ThreadPoolExecutor(self.threads) as pool:
            # map yields in shard order; each shard's bytes are dropped once its members are indexed.
            for shard_id, data in enumerate(pool.map(self._read_shard, self.shards)):
                if data is not None:
                    index.extend((shard_id, key, members) for key, members in shard_members(data))
        if not index:
            raise ValueError(f"source '{self.name}' has no samples in {self.storage.url}: {self.shards}")
        return index

    # ----- lazy: one shard at a time, on first use ----------------------------------------------------------

    def _shard_samples(self, shard_id: int) -> list[tuple[str, Members]] | None:
        """The members of one shard (None: missing and skipped), loaded once even under concurrent readers."""
        if shard_id in self._shard_index:
            return self._shard_index[shard_id]
        with self._lock:
            lock = self._locks.setdefault(shard_id, threading.Lock())
        with lock:
            if shard_id not in self._shard_index:
                self._shard_index[shard_id] = self._load_shard(shard_id)
        return self._shard_index[shard_id]

    def _load_shard(self, shard_id: int) -> list[tuple[str, Members]] | None:
        shard = self.shards[shard_id]
        samples = None
        if self.index_suffix:
            try:
                entries = json.loads(self.storage.read(shard + self.index_suffix))
                samples = [(key, {ext: (int(span[0]), int(span[1])) for ext, span in members.items()})
                           for key, members in entries]
            except FileNotFoundError:
                pass  # no sidecar: index from the shard itself
        if samples is None:
            data = self._read_shard(shard)
            if data is None:
                return None
            samples = shard_members(data)
        expected = self._starts[shard_id + 1] - self._starts[shard_id]
        if len(samples) != expected:
            raise ValueError(f"source '{self.name}': shard {self.storage.url}/{shard} holds {len(samples)} samples, "
                             f"the manifest says {expected}")
        return samples

    def unindexed_shards(self, positions: Iterable[int]) -> list[int]:
        """The shards that samples ``positions`` lie in whose index is not loaded yet (none for an eager index)."""
        if not self.lazy:
            return []
        return sorted({bisect.bisect_right(self._starts, position) - 1 for position in positions}
                      - self._shard_index.keys())

    def load_index(self, shard_id: int) -> None:
        """Load one shard's index now, e.g. ahead of its draws and alongside other shards'. A failure is left to
        the draws that land in it: they read it again and raise it with their own context (a missing shard's
        name, the corrupt sample's key)."""
        try:
            self._shard_samples(shard_id)
        except Exception:  # noqa: BLE001 (raised again, where it matters, by the draws' own reads)
            pass

    def _entry(self, position: int) -> tuple[int, str, Members]:
        if not self.lazy:
            len(self)
            return self._index[position]
        shard_id = bisect.bisect_right(self._starts, position) - 1
        samples = self._shard_samples(shard_id)
        if samples is None:
            raise SampleError(f"shard {self.shards[shard_id]} is missing (data.skip_missing_shards)")
        key, members = samples[position - self._starts[shard_id]]
        return shard_id, key, members

    # ----- access -------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        if self.lazy:
            return self._starts[-1]
        if self._index is None:
            self._index = self._build_index()
        return len(self._index)

    def locate(self, position: int) -> str:
        """``shard:key`` of sample ``position``, for logs."""
        try:
            shard_id, key, _ = self._entry(position)
        except SampleError:
            shard_id, key = bisect.bisect_right(self._starts, position) - 1, f"#{position}"
        return f"{self.storage.url}/{self.shards[shard_id]}:{key}"

    def _read_members(self, shard: str, members: Members) -> dict[str, bytes]:
        """A sample's members, in one ranged request when they lie together (as a tar writer puts them: only their
        headers, 512 bytes and padding each, lie between them), else one request per member."""
        start = min(offset for offset, _ in members.values())
        end = max(offset + size for offset, size in members.values())
        if end - start > sum(size for _, size in members.values()) + 1024 * len(members):
            return {ext: self.storage.read_range(shard, offset, size) for ext, (offset, size) in members.items()}
        blob = self.storage.read_range(shard, start, end - start)
        return {ext: blob[offset - start:offset - start + size] for ext, (offset, size) in members.items()}

    def read(self, position: int) -> RawSample:
        """The raw members of sample ``position`` (0 <= position < len(self))."""
        shard_id, key, members = self._entry(position)
        shard = self.shards[shard_id]
        try:
            data = self._read_members(shard, members)
        except FileNotFoundError:
            if not self.skip_missing:
                raise FileNotFoundError(f"source '{self.name}': shard {self.storage.url}/{shard} is missing "
                                        f"(data.skip_missing_shards=true skips it)") from None
            if shard not in self.missing_shards:
                self.missing_shards.append(shard)
            raise SampleError(f"shard {shard} is missing (data.skip_missing_shards)") from None
        return RawSample(self.name, f"{self.storage.url}/{shard}", key, data)
