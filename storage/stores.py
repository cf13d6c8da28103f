"""Where shards live: a local folder (``file://`` or a plain path) or S3-compatible object storage (``s3://``).

Both answer the same few calls (``read``, ``read_range``, ``size``, ``exists``, ``write``, ``list``) by key relative
to a root. S3 goes through boto3 (the standard credential chain; ``endpoint_url`` for non-AWS servers) with ranged
GETs, and retries what storage services do under load: throttling (503 SlowDown), 500s, dropped connections,
timeouts and bodies cut short (botocore retries requests, not body reads, so a short body is re-requested here for
its missing bytes). A key that does not exist fails at once, by name.

Every S3 request (retries included) first takes a token from a per-process :class:`TokenBucket`, so a process never
sends more than ``burst + rate * t`` requests in any ``t`` seconds; a throttling answer (503 SlowDown) halves the
bucket's rate, which then climbs back with each success (adaptive, like AWS's "adaptive" retry mode). A bounded
local disk cache of whole objects (storage/cache.py) sits in front when configured (storage/build.py).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

logger = logging.getLogger(__name__)

# The event that abandons the reads of the current thread (see abandoned_when), if any.
_abandon = threading.local()


@contextlib.contextmanager
def abandoned_when(event: threading.Event) -> Iterator[None]:
    """Within this block, this thread's S3 reads stop retrying once ``event`` is set (their caller is gone: e.g. a
    closed loader's reads ahead), failing with an OSError instead of trying up to ``max_attempts`` times with
    backoff, seconds each, against storage that may be down."""
    previous = getattr(_abandon, "event", None)
    _abandon.event = event
    try:
        yield
    finally:
        _abandon.event = previous


class Storage(Protocol):
    url: str

    def read_range(self, key: str, start: int, length: int) -> bytes: ...

    def read(self, key: str) -> bytes: ...

    def size(self, key: str) -> int: ...

    def exists(self, key: str) -> bool: ...

    def write(self, key: str, data: bytes) -> None: ...

    def list(self, prefix: str = "") -> list[str]: ...


@dataclass
class S3Options:
    endpoint_url: str = ""
    region: str = ""
    max_attempts: int = 8
    # Backoff before attempt k: base * 2^k seconds, with full jitter, at most cap.
    backoff_base_s: float = 0.05
    backoff_cap_s: float = 5.0
    # Per-process request-rate limit (0: none) and the burst allowed above it.
    requests_per_second: float = 0.0
    request_burst: int = 32


class TokenBucket:
    """A thread-safe token bucket: at most ``burst + rate * t`` grants in any window of ``t`` seconds.

    A caller that finds the bucket empty reserves the next token (the count goes negative) and sleeps until it is
    due, so concurrent callers queue fairly instead of waking together. ``rate <= 0`` means no limit.

    Args:
        rate: Tokens per second.
        burst: Bucket size (at least 1).
        clock: Monotonic seconds; injectable so the arithmetic can be checked without sleeping.
        sleep: How to wait.
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.max_rate = self.rate = float(rate)
        self.burst = max(1, int(burst))
        self.clock, self.sleep = clock, sleep
        self.tokens = float(self.burst)
        self.stamp = clock()
        self.lock = threading.Lock()

    def acquire(self) -> float:
        """Take one token, waiting if needed; returns the seconds waited."""
        if self.rate <= 0:
            return 0.0
        with self.lock:
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            self.tokens -= 1
            wait = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait > 0:
            self.sleep(wait)
        return wait

    def throttled(self) -> None:
        """The server asked us to slow down: halve the rate (down to a sixteenth of the configured one)."""
        if self.max_rate > 0:
            with self.lock:
                self.rate = max(self.max_rate / 16, self.rate / 2)

    def succeeded(self) -> None:
        """Additive recovery towards the configured rate (about 20 successes from the floor)."""
        if self.max_rate > 0 and self.rate < self.max_rate:
            with self.lock:
                self.rate = min(self.max_rate, self.rate + self.max_rate / 20)


_BUCKETS: dict[tuple[float, int], TokenBucket] = {}
_BUCKETS_LOCK = threading.Lock()


def process_bucket(rate: float, burst: int) -> TokenBucket:
    """The one bucket of this process for these settings: every storage object (and prefetch thread) of a
    process shares it, so the limit holds per process however many are opened."""
    with _BUCKETS_LOCK:
        return _BUCKETS.setdefault((float(rate), int(burst)), TokenBucket(rate, burst))


def read_file_range(path: str | Path, start: int, length: int) -> bytes:
    """``length`` bytes of a local file from ``start`` (fewer only at its end), with ``pread`` and no file object:
    opening a buffered file costs more than reading a small sample. Raises FileNotFoundError."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks, got = [], 0
        while got < length:  # one call unless the read is cut short (Linux returns at most ~2 GiB per call)
            piece = os.pread(fd, length - got, start + got)
            if not piece:  # the end of the file
                break
            chunks.append(piece)
            got += len(piece)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        os.close(fd)


class LocalStorage:
    """Files under a local folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def read_range(self, key: str, start: int, length: int) -> bytes:
        return read_file_range(self._path(key), start, length)

    def read(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(path.name + ".tmp")
        staging.write_bytes(data)
        staging.replace(path)

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix)
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file()) if base.exists() else []


class S3Storage:
    """Objects under ``s3://bucket/prefix``, read with ranged GETs and retried on transient faults."""

    def __init__(self, url: str, options: S3Options | None = None):
        import boto3
        from botocore.config import Config

        self.url = url
        self.options = options or S3Options()
        bucket, _, prefix = url[len("s3://"):].partition("/")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        # One retry loop for everything (requests and body reads), ours: botocore's own would nest inside it and
        # multiply the waits.
        config = Config(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=10, read_timeout=30)
        self.client = boto3.client("s3", endpoint_url=self.options.endpoint_url or None,
                                   region_name=self.options.region or None, config=config)
        self.bucket_limit = process_bucket(self.options.requests_per_second, self.options.request_burst)

    def __getstate__(self) -> dict:
        # Picklable for worker processes: each builds its own client (and shares its own process's bucket).
        return {"url": self.url, "options": self.options}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["url"], state["options"])

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _retry(self, what: str, key: str, call):
        from botocore.exceptions import BotoCoreError, ClientError

        for attempt in range(self.options.max_attempts):
            self.bucket_limit.acquire()  # every attempt is a request: retries count against the limit too
            try:
                result = call()
                self.bucket_limit.succeeded()
                return result
            except ClientError as error:
                code = error.response.get("Error", {}).get("Code", "")
                if code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket"):
                    raise FileNotFoundError(f"{self.url}/{key} does not exist ({code})") from None
                if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                    raise PermissionError(f"{what} {self.url}/{key}: {code}") from None
                failure = f"{code or 'error'}"
                if code in ("SlowDown", "503", "Throttling", "ThrottlingException", "RequestLimitExceeded"):
                    self.bucket_limit.throttled()
            except (BotoCoreError, ConnectionError, TimeoutError, ShortRead) as error:
                failure = type(error).__name__
            if attempt + 1 == self.options.max_attempts:
                break
            abandon = getattr(_abandon, "event", None)  # see abandoned_when
            delay = random.uniform(0, min(self.options.backoff_cap_s, self.options.backoff_base_s * 2**attempt))
            if abandon is None or not abandon.is_set():
                logger.warning("%s %s/%s failed (%s), attempt %d of %d; retrying in %.2fs", what, self.url, key,
                               failure, attempt + 1, self.options.max_attempts, delay)
                if abandon is None:
                    time.sleep(delay)
                    continue
                if not abandon.wait(delay):
                    continue
            raise OSError(f"{what} {self.url}/{key} abandoned after {attempt + 1} attempts (its reader was closed); "
                          f"last: {failure}")
        raise OSError(f"{what} {self.url}/{key} failed {self.options.max_attempts} times; last: {failure}")

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """Exactly ``length`` bytes from ``start`` (fewer only at the end of the object)."""
        chunks: list[bytes] = []
        got = 0
        while got < length:
            def fetch(offset=start + got, want=length - got) -> tuple[bytes, bool]:
                response = self.client.get_object(Bucket=self.bucket, Key=self._key(key),
                                                  Range=f"bytes={offset}-{offset + want - 1}")
                expected = int(response["ContentLength"])
                body = response["Body"].read()
                if len(body) != expected:  # the connection dropped mid-body: ask again for the rest
                    raise ShortRead(f"{len(body)} of {expected} bytes")
                return body, expected < want  # fewer bytes than asked: the object ends there

            piece, ended = self._retry("read", key, fetch)
            chunks.append(piece)
            got += len(piece)
            if ended:
                break
        return b"".join(chunks)

    def read(self, key: str) -> bytes:
        size = self.size(key)
        return self.read_range(key, 0, size) if size else b""

    def size(self, key: str) -> int:
        head = self._retry("stat", key, lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key)))
        return int(head["ContentLength"])

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except FileNotFoundError:
            return False
        return True

    def write(self, key: str, data: bytes) -> None:
        self._retry("write", key, lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data))

    def upload(self, key: str, stream) -> None:
        """Upload a seekable binary stream of any size (multipart above 64 MiB, parts in parallel); a failed
        attempt is retried from the stream's start."""
        from boto3.s3.transfer import TransferConfig

        transfer = TransferConfig(multipart_threshold=64 * 2**20, multipart_chunksize=64 * 2**20)

        def put() -> None:
            stream.seek(0)
            # boto3's transfer manager closes what it uploads, even on failure: hand it a view, keep the stream.
            self.client.upload_fileobj(_KeepOpen(stream), self.bucket, self._key(key), Config=transfer)

        self._retry("upload", key, put)

    def copy(self, source: str, target: str) -> None:
        self._retry("copy", source, lambda: self.client.copy_object(
            Bucket=self.bucket, Key=self._key(target), CopySource={"Bucket": self.bucket, "Key": self._key(source)}))

    def delete(self, keys: list[str]) -> None:
        """Delete objects (a missing one is not an error), up to 1,000 per request."""
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._key(key)} for key in keys[start:start + 1000]]
            response = self._retry("delete", batch[0]["Key"], lambda batch=batch: self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}))
            if response.get("Errors"):
                failed = ", ".join(f"{e['Key']} ({e.get('Code')})" for e in response["Errors"][:5])
                raise OSError(f"deleting from {self.url} failed for {failed}")

    def list(self, prefix: str = "") -> list[str]:
        keys, token = [], None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = self._retry("list", prefix, lambda extra=extra: self.client.list_objects_v2(
                Bucket=self.bucket, Prefix=self._key(prefix), **extra))
            base = len(self.prefix) + 1 if self.prefix else 0
            keys += [item["Key"][base:] for item in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return sorted(keys)
            token = page["NextContinuationToken"]


class _KeepOpen(io.RawIOBase):
    """A readable, seekable view of a binary stream whose ``close`` leaves the stream open."""

    def __init__(self, stream):
        self.stream = stream

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self.stream.read(size)

    def readinto(self, buffer) -> int:
        data = self.stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.stream.seek(offset, whence)

    def tell(self) -> int:
        return self.stream.tell()


class ShortRead(OSError):
    """A response body shorter than its Content-Length (a connection cut mid-transfer)."""


def open_storage(url: str | Path, options: S3Options | None = None) -> Storage:
    """The storage behind ``url``: ``s3://bucket/prefix``, ``file:///path`` or a plain path."""
    text = str(url)
    if text.startswith("s3://"):
        return S3Storage(text, options)
    if text.startswith("file://"):
        text = text[len("file://"):]
    return LocalStorage(text)
