"""The storage a run reads its data from, as its ``DataConfig`` describes it."""

from __future__ import annotations

from storage.cache import CachedStorage, DiskCache
from storage.stores import S3Options, S3Storage, Storage, open_storage

__all__ = ["build_storage"]


def build_storage(data) -> Storage:
    """The storage a run reads from, from its ``DataConfig``: S3 with the rate limit and, if ``cache_dir`` is set,
    the bounded disk cache in front; a local folder as it is (caching local files would only copy them)."""
    options = S3Options(endpoint_url=data.endpoint_url, region=data.region, max_attempts=data.max_attempts,
                        requests_per_second=data.requests_per_second, request_burst=data.request_burst)
    storage = open_storage(data.root, options)
    if data.cache_dir and isinstance(storage, S3Storage):
        storage = CachedStorage(storage, DiskCache(data.cache_dir, data.cache_max_bytes))
    return storage
