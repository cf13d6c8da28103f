"""What ``python -m data.prepare`` reads: input records, and their plain forms turned into samples.

Records come from a JSONL file (one per line), from webdataset tars (``<key>.<ext>`` members, as img2dataset
writes them), or from a folder of either, or of unpacked ``<key>.<ext>`` files. A record is either a full sample
(``segments``, see :mod:`data.samples`) or one of the plain forms:

- ``{"text": "..."}``: a text sample;
- ``{"image": "path.png", "text": "..."}`` (``caption`` for ``text`` works too): a captioned image;
- ``{"images": ["a.png", "b.jpg"], "text": "..."}``: images followed by their text (``interleaved``);
- tar or folder members ``<key>.jpg|png|webp`` with ``<key>.txt`` and/or ``<key>.json`` (``caption`` or ``text``).

Image paths are relative to the JSONL's folder unless absolute. Records are read lazily, in order; turning them
into members (:func:`to_members`) happens in the worker processes, so reading a line costs the main process
little.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Image member extensions of the plain forms, in the order a record's images are taken.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
PLAIN_FORMS = ("{'text': ...}, {'image': path, 'text': ...}, {'images': [paths], 'text': ...} or a full sample "
               "with 'segments'")


class Rejected(Exception):
    """A record left out of the output: ``reason`` groups it in the report, ``detail`` says what exactly."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class Record:
    """One input record, not parsed yet: a JSONL line, or a group of members (bytes, or files to read)."""

    where: str  # how the report names it: "line 12", "key photo7", "part-0.tar: photo7"
    key: str
    line: str | None = None
    base: str = ""  # the folder a line's relative image paths start from
    members: dict[str, bytes] | None = None
    files: dict[str, str] | None = None


def read_records(path: Path, source: str) -> Iterator[Record]:
    """The records of ``path``: a ``.jsonl`` or ``.tar`` file, or a folder of tars, of JSONL files, or of unpacked
    ``<key>.<ext>`` files (in that order of preference). Raises :class:`FileNotFoundError` naming the path."""
    if path.is_file():
        yield from (_read_tar(path) if path.name.endswith(".tar") else _read_jsonl(path, source, path.stem))
        return
    if not path.is_dir():
        raise FileNotFoundError(f"--input {path}: no such file or folder")
    tars = sorted(path.rglob("*.tar"))
    jsonls = sorted(path.rglob("*.jsonl"))
    if tars:
        for tar in tars:
            yield from _read_tar(tar, prefix=f"{tar.relative_to(path)}: ")
    elif jsonls:
        for index, jsonl in enumerate(jsonls):
            # Keys of a single file are <source>-<line>; several files need their own prefix to stay unique.
            yield from _read_jsonl(jsonl, source if len(jsonls) == 1 else f"{source}-{index}", jsonl.stem,
                                   prefix="" if len(jsonls) == 1 else f"{jsonl.relative_to(path)}: ")
    else:
        yield from _read_folder(path)


def _read_jsonl(path: Path, source: str, stem: str, prefix: str = "") -> Iterator[Record]:
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines):
            if line.strip():
                # Keys count lines from 0, and must stay so: held-out membership is a hash of the key.
                yield Record(f"{prefix}line {number + 1}", f"{source}-{number:06d}", line=line, base=str(path.parent))


def _read_tar(path: Path, prefix: str = "") -> Iterator[Record]:
    """Members grouped by key, in the order of the tar (webdataset keeps a sample's members together)."""
    key, members = None, {}
    with tarfile.open(path, mode="r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            name = info.name.rsplit("/", 1)[-1]
            folder = info.name[:-len(name)]
            stem, _, ext = name.partition(".")
            if stem.startswith(".") or not ext:
                continue
            sample_key = (folder + stem).replace("/", "_")
            if sample_key != key and key is not None:
                yield Record(f"{prefix}key {key}", key, members=members)
                members = {}
            key = sample_key
            members[ext] = tar.extractfile(info).read()
    if key is not None:
        yield Record(f"{prefix}key {key}", key, members=members)


def _read_folder(folder: Path) -> Iterator[Record]:
    groups: dict[str, dict[str, str]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stem, _, ext = path.name.partition(".")
        if ext:
            groups.setdefault(str(path.parent.relative_to(folder) / stem), {})[ext] = str(path)
    for key, files in sorted(groups.items()):
        key = key.replace("/", "_")
        yield Record(f"key {key}", key, files=files)


def _read_file(path: str, base: str) -> bytes:
    full = Path(path) if Path(path).is_absolute() else Path(base) / path
    try:
        return full.read_bytes()
    except FileNotFoundError:
        raise Rejected("missing file", str(full)) from None
    except OSError as error:
        raise Rejected("unreadable file", f"{full}: {error.strerror}") from None


def to_members(record: Record) -> tuple[str, dict[str, bytes]]:
    """The record as a sample's key and tar members (``json`` and its images); raises :class:`Rejected`."""
    if record.line is not None:
        try:
            meta = json.loads(record.line.strip())
        except json.JSONDecodeError as error:
            raise Rejected("malformed JSON", f"{error.msg} at column {error.colno}") from None
        if not isinstance(meta, dict):
            raise Rejected("malformed JSON", f"a line must be a JSON object, not {type(meta).__name__}")
        key = str(meta.pop("key", record.key))
        if "segments" in meta:  # the full form: images maps member names to files
            images = meta.pop("images", {}) or {}
            if not isinstance(images, dict):
                raise Rejected("bad images field", "a full sample's 'images' maps member names to files")
            members = {"json": json.dumps(meta, sort_keys=True).encode("utf-8")}
            for ext, file in images.items():
                members[ext] = _read_file(str(file), record.base)
            return key, members
        paths = meta.get("images", [meta["image"]] if "image" in meta else [])
        if isinstance(paths, str):
            paths = [paths]
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise Rejected("bad images field", "'image' is a path, 'images' a list of paths")
        images = [(_image_ext(path), _read_file(path, record.base)) for path in paths]
        return key, _plain_members(meta, images)
    members = record.members
    if members is None:
        members = {ext: _read_file(path, "") for ext, path in (record.files or {}).items()}
    meta = _json_member(members)
    if meta is not None and "segments" in meta:
        return record.key, members
    images = [(ext, members[ext]) for ext in sorted(members, key=_image_order) if _image_ext(ext) in IMAGE_EXTS]
    text = members.get("txt")
    meta = dict(meta or {})
    if text is not None:
        try:
            meta["text"] = text.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise Rejected("invalid UTF-8", "the .txt member") from None
    return record.key, _plain_members(meta, images)


def _json_member(members: dict[str, bytes]) -> dict | None:
    if "json" not in members:
        return None
    try:
        meta = json.loads(members["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise Rejected("malformed JSON", f"the .json member: {error}") from None
    if not isinstance(meta, dict):
        raise Rejected("malformed JSON", "the .json member must be an object")
    return meta


def _image_ext(name: str) -> str:
    """A file's or member's image extension (``img`` when it has none of :data:`IMAGE_EXTS`: images are told
    apart by their bytes, not their names)."""
    ext = name.rsplit("/", 1)[-1].rsplit(".", 1)[-1].lower()
    return ext if ext in IMAGE_EXTS else "img"


def _image_order(ext: str) -> tuple[int, str]:
    return (IMAGE_EXTS.index(_image_ext(ext)) if _image_ext(ext) in IMAGE_EXTS else len(IMAGE_EXTS), ext)


def _plain_members(meta: dict, images: list[tuple[str, bytes]]) -> dict[str, bytes]:
    """A plain record (text and/or images) as a sample: ``text``, ``caption`` or ``interleaved``."""
    text = meta.get("text", meta.get("caption"))
    if not isinstance(text, str) or not text.strip():
        raise Rejected("no text", f"expected {PLAIN_FORMS}" if not images else "an image needs its text or caption")
    text = text.strip()
    if not images:
        sample = {"kind": "text", "segments": [{"text": text}]}
        return {"json": json.dumps(sample).encode("utf-8")}
    names = [f"{index}.{_image_ext(ext)}" for index, (ext, _) in enumerate(images)]
    segments = [{"image": name} for name in names] + [{"text": text}]
    sample = {"kind": "caption", "caption": text} if len(images) == 1 else {"kind": "interleaved"}
    sample["segments"] = segments
    return {"json": json.dumps(sample).encode("utf-8"), **{name: data for name, (_, data) in zip(names, images)}}
