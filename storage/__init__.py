"""Where data and checkpoints live: a local folder or S3-compatible object storage, behind one small interface.

``stores`` holds the stores (retries, rate limit), ``cache`` the bounded node-local disk cache of S3 objects, and
``build`` the storage a run's ``DataConfig`` describes. Data loading and checkpointing both use it.
"""

from storage.build import build_storage
from storage.cache import CachedStorage, DiskCache
from storage.stores import (
    LocalStorage,
    S3Options,
    S3Storage,
    ShortRead,
    Storage,
    TokenBucket,
    abandoned_when,
    open_storage,
    process_bucket,
    read_file_range,
)

__all__ = ["CachedStorage", "DiskCache", "LocalStorage", "S3Options", "S3Storage", "ShortRead", "Storage",
           "TokenBucket", "abandoned_when", "build_storage", "open_storage", "process_bucket", "read_file_range"]
