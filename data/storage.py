"""Where shards live: a local folder (``file://`` or a plain path) or S3-compatible object storage (``s3://``).

Both answer the same few calls (``read``, ``read_range``, ``size``, ``exists``, ``write``, ``list``) by key relative
to a root. S3 goes through boto3 (the standard credential chain; ``endpoint_url`` for non-AWS servers) with ranged
GETs, and retries what storage services do under load: throttling (503 SlowDown), 500s, dropped connections,
timeouts and bodies cut short (botocore retries requests, not body reads, so a short body is re-requested here for
its missing bytes). A key that does not exist fails at once, by name.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

logger = logging.getLogger(__name__)


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


class LocalStorage:
    """Files under a local folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def read_range(self, key: str, start: int, length: int) -> bytes:
        with self._path(key).open("rb") as f:
            f.seek(start)
            return f.read(length)

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
        config = Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=10, read_timeout=30)
        self.client = boto3.client("s3", endpoint_url=self.options.endpoint_url or None,
                                   region_name=self.options.region or None, config=config)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _retry(self, what: str, key: str, call):
        from botocore.exceptions import BotoCoreError, ClientError

        for attempt in range(self.options.max_attempts):
            try:
                return call()
            except ClientError as error:
                code = error.response.get("Error", {}).get("Code", "")
                if code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket"):
                    raise FileNotFoundError(f"{self.url}/{key} does not exist ({code})") from None
                if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                    raise PermissionError(f"{what} {self.url}/{key}: {code}") from None
                failure = f"{code or 'error'}"
            except (BotoCoreError, ConnectionError, TimeoutError, ShortRead) as error:
                failure = type(error).__name__
            delay = random.uniform(0, min(self.options.backoff_cap_s, self.options.backoff_base_s * 2**attempt))
            logger.warning("%s %s/%s failed (%s), attempt %d of %d; retrying in %.2fs", what, self.url, key, failure,
                           attempt + 1, self.options.max_attempts, delay)
            time.sleep(delay)
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
