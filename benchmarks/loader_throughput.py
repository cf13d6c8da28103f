"""The data loader against its floors, from a real S3 HTTP server (moto's, in its own process on 127.0.0.1).

Prints one JSON line:

- ``throughput_vs_decode_floor``: image-text samples/s through our whole loader (ranged reads from S3 through the
  disk cache, JSON, decode, augmentation, patchify, tokenize, collate) ÷ samples/s of bare image decoding (PIL,
  bytes already in memory, one thread) of the same shards, each the median of ``--repeats`` windows taken in turn
  (``loader_windows``, ``decode_floor_windows``: this machine's speed drifts). The floor's window starts once the
  reads the loader asked for ahead are done, and each loader window after ``WARMUP_BATCHES`` untimed batches, so
  neither window gets the other's work. Goal >= 0.8. The loader runs as configured for a production run on this
  machine: ``data.loader_workers`` = one worker process per core (``--workers``, default ``os.cpu_count()``),
  ``prefetch_samples=8`` draws per slot ahead, ``prefetch_threads=4``; the floor is one thread.
  On the demo shards (PNGs of 56-224 px, quick to decode) the loader's fixed per-sample work dominates;
  ``photos_*`` repeats the measurement on 1024x768 JPEGs built with ``data.prepare``, where decoding is most of the
  work (the loader decodes them at the DCT scale its 256-patch grid needs).
- ``read_ceiling_vs_decode_floor``: the same, for ``--workers`` processes doing nothing but the per-draw read
  (``SampleReader.read_many`` over the stream's draws in chunks of a worker request: fetch, parse, decode, augment,
  patchify, tokenize) with no loader around it -- no planning, no hand-over, no batches -- each window against the
  floor measured just before it; what any pipeline around that read could reach on these cores.
  ``loader_vs_read_ceiling`` is the loader's ratio over the ceiling's: the share of it the pipeline keeps.
- ``packing_efficiency``: real tokens ÷ row tokens of 8K rows of the demo ``joint_pretrain`` mixture. Goal >= 0.99.
- ``resume_latency_ratio``: time to the first batch of a new loader resumed at global sample 1,000,000 ÷ at
  sample 0 (medians of ``--resume-repeats`` each, alternating), read ahead on threads (no worker processes, whose
  start would dominate both); the stage's recipe is composed before the clock starts (Hydra's composition would
  dilute the ratio). Goal <= 1.2.
- The same throughput and resume figures for torchdata's ``StatefulDataLoader`` (a map-style dataset doing the
  same per-sample work on the same storage, 2 workers) and megatron-energon (2 workers, decoding to tensors, on
  local copies of the same shards, run from its own venv, made on first use), or the reason one was not measured.

Before anything is timed, each baseline is checked to do the measured work on the same samples
(``benchmarks/_check.py``: one line on stderr and exit status 1 otherwise), exactly (identical bytes or tensors):

- the decode floor decodes the very bytes the loader reads: every image of the sources' shards on the S3 server
  equals the local copy the floor decodes;
- the read ceiling reads the loader's stream: ``read_many`` of the first batch's planned draws, collated, equals a
  fresh loader's first batch (pixels, grids, text ids and mask);
- resuming computes the same stream: a loader resumed from the state after two batches gives the third batch of
  the loader that saved it (the 1,000,000 state of the latency figure is built by hand, as a checkpoint's would be);
- the torchdata dataset does our per-sample work: for the first samples of each source, its patches and caption
  ids equal our reader's with augmentation off (its one difference: ours augments grounding images), bos and eos
  aside;
- megatron-energon reads the same corpus: its untimed first batch holds 16 samples whose captions are all the
  corpus's (checked after its run: it runs in its own process).

    python benchmarks/loader_throughput.py [--scale 0.5 --batches 60 --repeats 5 --workers 2 --energon-python PY]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image

try:
    from benchmarks._check import require, require_equal
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    from _check import require, require_equal

SOURCES = ("caption", "ocr", "grounding")  # the image-text sources of vit_coca
RESUME_AT = 1_000_000
PREFETCH_SAMPLES = 8  # draws per slot our loader reads ahead
# Untimed batches before each of our loader's windows: the reads it asked for ahead finished while the floor was
# measured (free samples for a window that started with them); by then the loader is back in its steady state.
WARMUP_BATCHES = PREFETCH_SAMPLES
BUCKET = "bench-data"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_s3(root: Path) -> tuple[subprocess.Popen, str]:
    """moto's server in its own process (it must not share our GIL), with the corpus uploaded."""
    import boto3

    port = free_port()
    code = ("from moto.server import ThreadedMotoServer; import time; "
            f"ThreadedMotoServer(ip_address='127.0.0.1', port={port}).start(); time.sleep(10**6)")
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        client.put_object(Bucket=BUCKET, Key=f"demo/{path.relative_to(root)}", Body=path.read_bytes())
    return server, endpoint


def shard_images(storage, sources: tuple[str, ...]) -> list[bytes]:
    """The encoded images of the sources' shards."""
    manifest = json.loads(storage.read("manifest.json"))
    images = []
    for source in sources:
        for shard in manifest["sources"][source]["shards"]:
            with tarfile.open(fileobj=io.BytesIO(storage.read(shard))) as tar:
                images += [tar.extractfile(m).read() for m in tar.getmembers() if not m.name.endswith(".json")]
    return images


def decode_floor(images: list[bytes]) -> float:
    """Samples/s of decoding every image, bytes already in memory, one thread."""
    start = time.perf_counter()
    for data in images:
        Image.open(io.BytesIO(data)).convert("RGB")
    return len(images) / (time.perf_counter() - start)


def coca_stage(sources: tuple[str, ...] = SOURCES):
    from config import MixtureConfig, load_config

    stage = load_config(["recipe=debug"]).curriculum.stages["vit_coca"]
    # Native resolution up to 256 patches (the demo images, at most 224 px, fit whole); no progressive ramp.
    stage.max_image_patches, stage.min_image_patches, stage.micro_batch_size = 256, 0, 16
    if sources != SOURCES:
        stage.mixture = MixtureConfig(multimodal_sources={s: 1.0 for s in sources}, multimodal_share_start=1.0,
                                      multimodal_share_end=1.0)
    return stage


def our_loader(url: str, endpoint: str, tokenizer, cache: str, sources: tuple[str, ...] = SOURCES, workers: int = 0,
               stage=None):
    """Our loader of the benchmark's stage (``stage``: composed already, e.g. outside a timed window: composing the
    recipe with Hydra is slow beside a loader's start)."""
    from config import DataConfig
    from data.loader import StageLoader
    from model.registry import FLAVORS
    from storage import build_storage

    data = DataConfig(root=url, endpoint_url=endpoint, cache_dir=cache, prefetch_samples=PREFETCH_SAMPLES,
                      prefetch_threads=4, loader_workers=workers)
    return StageLoader("vit_coca", stage or coca_stage(sources), data, build_storage(data), tokenizer,
                       FLAVORS["debug"].vision, 0, (0, 1))


def samples_per_s(url: str, endpoint: str, tokenizer, cache: str, batches: int, sources=SOURCES,
                  workers: int = 0, repeats: int = 1, floor_images: list[bytes] | None = None) -> dict:
    """Our loader's samples/s over ``repeats`` windows of ``batches`` batches of one stream (median), and with
    ``floor_images`` the decode floor measured between the windows (median): a shared machine's speed drifts within
    a minute, and a ratio of two medians taken side by side is steadier than two lone figures."""
    loader = our_loader(url, endpoint, tokenizer, cache, sources, workers)
    loader.next_image_text_batch(0.0)  # worker start, the first shard indexes and cache fills
    rates, floors, step, total = [], [], 0, (batches + WARMUP_BATCHES) * repeats + 1
    for _ in range(repeats):
        if floor_images:
            loader.settle()  # the reads the loader asked for ahead must not run during the floor's window
            floors.append(decode_floor(floor_images))
        for _ in range(WARMUP_BATCHES):  # ... nor count for its own: the window starts with none of them done
            step += 1
            loader.next_image_text_batch(step / total)
        start = time.perf_counter()
        for _ in range(batches):
            step += 1
            loader.next_image_text_batch(step / total)
        rates.append(batches * 16 / (time.perf_counter() - start))
    loader.close()
    result = {"loader": statistics.median(rates), "loader_windows": [round(r) for r in rates]}
    if floors:
        result.update(floor=statistics.median(floors), floor_windows=[round(f) for f in floors])
    return result


CEILING_WINDOW_S = 1.5


def _read_windows(reader, keys: list, offset: int, chunk: int, windows: int, barrier, counts) -> None:
    """A read-ceiling process: from ``keys[offset]`` round the list, ``reader.read_many`` of ``chunk`` draws (a
    worker request's) at a time, for :data:`CEILING_WINDOW_S` after each barrier; puts "ready" once warm, then
    (samples, seconds) per window."""
    import cv2
    import torch

    torch.set_num_threads(1)  # as a loader worker (data.workers._serve)
    cv2.setNumThreads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    for start in range(0, 8 * chunk, chunk):  # shard indexes and the first touches, outside any window
        reader.read_many(keys[offset + start:offset + start + chunk])
    counts.put("ready")
    position = offset
    for _ in range(windows):
        barrier.wait(timeout=600)  # the benchmark gone: give up, do not hang
        samples, start = 0, time.perf_counter()
        while time.perf_counter() - start < CEILING_WINDOW_S:
            if position + chunk > len(keys):
                position = 0
            reader.read_many(keys[position:position + chunk])
            position += chunk
            samples += chunk
        counts.put((samples, time.perf_counter() - start))


def read_ceiling(url: str, endpoint: str, tokenizer, cache: str, processes: int, windows: int,
                 floor_images: list[bytes]) -> dict:
    """Samples/s of ``processes`` processes doing only the per-draw read of our loader's stream (the draws of its
    16 slots, in the order batches take them, as our loader's workers get them), and the decode floor measured
    before each window (medians), on the same storage and warm disk cache as :func:`samples_per_s`."""
    import multiprocessing

    from data.reader import worker_request_draws

    loader = our_loader(url, endpoint, tokenizer, cache)
    draws_per_slot = 300
    plans = [loader.planner.plan(slot, 0.5, draws_per_slot)[0] for slot in loader.slots]  # the stream's draws
    keys = [plan[k] for k in range(draws_per_slot) for plan in plans]
    context = multiprocessing.get_context("spawn")  # as the loader's workers
    barrier, counts = context.Barrier(processes + 1), context.Queue()
    chunk = worker_request_draws(PREFETCH_SAMPLES * len(loader.slots), processes)  # as our loader's requests
    readers = [context.Process(target=_read_windows,
                               args=(loader.reader.sample_reader, keys, i * len(keys) // processes, chunk, windows,
                                     barrier, counts))
               for i in range(processes)]
    for process in readers:
        process.start()
    rates, floors = [], []
    try:
        for _ in range(processes):  # started and warm: none of them runs during the floor's window
            counts.get(timeout=300)
        for _ in range(windows):
            floors.append(decode_floor(floor_images))  # the readers wait at the barrier meanwhile
            barrier.wait(timeout=600)  # a reader that died never arrives: fail, do not hang
            rates.append(sum(samples / seconds for samples, seconds in (counts.get(timeout=120)
                                                                         for _ in range(processes))))
    finally:
        for process in readers:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
        loader.close()
    return {"read_ceiling_samples_per_s": statistics.median(rates), "read_ceiling_windows": [round(r) for r in rates],
            "read_ceiling_floor_windows": [round(f) for f in floors],
            "read_ceiling_vs_decode_floor": statistics.median(rates) / statistics.median(floors)}


def require_same_batch(name: str, actual, expected) -> None:
    """Two image-text batches hold the same tensors."""
    for field in ("pixel_values", "image_grid_hw", "text_ids", "text_mask"):
        require_equal(f"{name}: {field}", getattr(actual, field), getattr(expected, field))


def check_baselines(url: str, endpoint: str, tokenizer, root: Path, tmp: Path) -> None:
    """The floor, the read ceiling, resuming and the torchdata dataset against our loader (see the module
    docstring)."""
    import dataclasses

    from data.augment import AugmentConfig
    from data.packing import collate_image_text
    from storage import LocalStorage, S3Options, S3Storage

    local = shard_images(LocalStorage(root), SOURCES)
    require("decode floor images vs the loader's on S3",
            shard_images(S3Storage(url, S3Options(endpoint_url=endpoint)), SOURCES) == local,
            "the S3 shards' images differ from the local copies the floor decodes")
    require("decode floor images", len(local) > 0, "the sources' shards hold no image")
    stage = coca_stage()
    first = our_loader(url, endpoint, tokenizer, "", stage=stage)
    try:  # every loader closed before a failed check exits (their read-ahead threads would outlive the server)
        keys = [first._plan(slot, 0.5, 1)[0][0] for slot in first.slots]  # noqa: SLF001 (the stream's draws)
        read = first.reader.read_many(keys)
        batches = [first.next_image_text_batch(0.5) for _ in range(2)]
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint holds it
        third = first.next_image_text_batch(0.5)
    finally:
        first.close()
    require("read ceiling draws", not any(isinstance(r, Exception) for r in read),
            f"the first batch's draws fail to read: {[r for r in read if isinstance(r, Exception)][:1]}")
    require_same_batch("read ceiling's read_many vs the loader's first batch",
                       collate_image_text(read, tokenizer.pad_id), batches[0])
    resumed = our_loader(url, endpoint, tokenizer, "", stage=stage)
    try:
        resumed.load_state_dict(state)
        after_resume = resumed.next_image_text_batch(0.5)
    finally:
        resumed.close()
    require_same_batch("resumed loader vs the uninterrupted one, third batch", after_resume, third)
    plain = our_loader(url, endpoint, tokenizer, "",
                       stage=dataclasses.replace(stage, augment=AugmentConfig(enabled=False)))
    dataset = ShardsDataset(url, endpoint, (root / "tokenizer.json").read_text(), "")
    dataset[0]  # opens its sources
    pairs, offset = [], 0
    try:
        for source in dataset.sources:
            for position in range(min(4, len(source))):
                pairs.append((f"{source.name} sample {position}", dataset[offset + position],
                              plain.reader.read(source.name, position, 0, stage.max_image_patches)))
            offset += len(source)
    finally:
        plain.close()
    for name, (patches, ids), (image, ours) in pairs:
        require_equal(f"torchdata dataset vs our reader, {name}: patches", patches, image.patches)
        require_equal(f"torchdata dataset vs our reader, {name}: caption ids", list(ids)[: stage.max_text_len - 2],
                      ours[1:-1])


def corpus_captions(root: Path) -> set[str]:
    """The captions of the image-text sources' samples, as energon's sample loader makes them."""
    from data.samples import caption_text

    captions = set()
    for source in SOURCES:
        for shard in sorted((root / source).glob("*.tar")):
            with tarfile.open(shard) as tar:
                captions |= {caption_text(json.loads(tar.extractfile(m).read())) for m in tar.getmembers()
                             if m.name.endswith(".json")}
    return captions


def photos(tmp: Path, endpoint: str, count: int) -> str:
    """``count`` 1024x768 JPEG photos-like images with captions, built into shards on S3 with data.prepare."""
    import numpy as np

    from data.prepare import prepare
    from storage import S3Options

    folder = tmp / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        # Smooth gradients with grain: decodes like a photo (neither flat nor pure noise).
        y, x = np.mgrid[0:768, 0:1024]
        base = np.stack([x * rng.uniform(0.1, 0.25), y * rng.uniform(0.1, 0.3), (x + y) * rng.uniform(0.05, 0.12)],
                        -1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
        text = f"photo {i} of a {rng.choice(['lake', 'street', 'forest', 'market'])}"
        lines.append({"kind": "caption", "caption": text, "segments": [{"image": "0.jpg"}, {"text": text}],
                      "images": {"0.jpg": f"photos/{i}.jpg"}})
    (tmp / "photos.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    url = f"s3://{BUCKET}/photos"
    prepare(tmp / "photos.jsonl", url, "photos", 100, options=S3Options(endpoint_url=endpoint))
    return url


def ours(url: str, endpoint: str, tokenizer, batches: int, tmp: Path, repeats: int, workers: int,
         floor_images: list[bytes], resume_repeats: int) -> dict:
    cached = samples_per_s(url, endpoint, tokenizer, str(tmp / "cache"), batches, workers=workers, repeats=repeats,
                           floor_images=floor_images)
    results = {"decode_floor_samples_per_s": cached["floor"], "decode_floor_windows": cached["floor_windows"],
               "loader_samples_per_s": cached["loader"], "loader_windows": cached["loader_windows"],
               "loader_samples_per_s_no_cache": samples_per_s(url, endpoint, tokenizer, "", batches,
                                                              workers=workers)["loader"]}
    state = {}
    for slot in range(16):  # a state at global sample 1,000,000: each of the 16 slots has drawn 62,500
        draws = RESUME_AT // 16
        shares = [int(draws * w) for w in (0.5, 0.25)]  # vit_coca's mixture weights
        state[f"slot{slot}"] = {"draws": draws, "corrupt": 0, "pending": None,
                                "source_draws": {"caption": shares[0], "grounding": shares[1],
                                                 "ocr": draws - sum(shares)}}
    latencies = {0: [], RESUME_AT: []}
    stage = coca_stage()  # the recipe is composed before the clock starts: the loader's own start is timed
    for _ in range(resume_repeats):
        for at in (0, RESUME_AT):
            start = time.perf_counter()
            loader = our_loader(url, endpoint, tokenizer, "", stage=stage)  # no cache: both index the same shards
            if at:
                loader.load_state_dict(state)
            loader.next_image_text_batch(0.5)
            latencies[at].append(time.perf_counter() - start)
            loader.close()
    results["first_batch_s_at_0"] = statistics.median(latencies[0])
    results["first_batch_s_at_1M"] = statistics.median(latencies[RESUME_AT])
    return results


class ShardsDataset:
    """A map-style dataset over the same shards doing the loader's per-sample work (ranged reads from S3, JSON,
    decode, patchify, tokenize); virtually long (index modulo the corpus) so that sample 1,000,000 exists."""

    def __init__(self, url: str, endpoint: str, tokenizer_json: str, cache: str):
        self.url, self.endpoint, self.tokenizer_json, self.cache = url, endpoint, tokenizer_json, cache
        self.sources = None

    def _open(self):
        from config import DataConfig
        from data.samples import ShardSource
        from data.tokenizer import TextTokenizer
        from storage import build_storage

        storage = build_storage(DataConfig(root=self.url, endpoint_url=self.endpoint, cache_dir=self.cache))
        manifest = json.loads(storage.read("manifest.json"))
        self.sources = [ShardSource(s, storage, manifest["sources"][s]["shards"], threads=4) for s in SOURCES]
        self.items = [(s, i) for s in self.sources for i in range(len(s))]
        self.tokenizer = TextTokenizer.from_bytes(self.tokenizer_json.encode())

    def __len__(self) -> int:
        return 2 * RESUME_AT

    def __getitem__(self, index: int):
        from data.samples import caption_text, load_images, load_meta

        if self.sources is None:  # per worker process: boto3 clients do not survive a fork
            self._open()
        source, position = self.items[index % len(self.items)]
        raw = source.read(position)
        meta = load_meta(raw)
        images = load_images(raw, meta, 14, 2, 256)
        return next(iter(images.values())).patches, self.tokenizer.encode(caption_text(meta))


def torchdata_figures(url: str, endpoint: str, tokenizer_json: str, batches: int, tmp: Path, repeats: int) -> dict:
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError as error:
        return {"torchdata_error": f"torchdata not installed ({error}): pip install -e .[bench]"}

    def build(cache: str):
        return StatefulDataLoader(ShardsDataset(url, endpoint, tokenizer_json, cache), batch_size=16, shuffle=True,
                                  num_workers=2, collate_fn=list, multiprocessing_context="fork")

    results = {}
    loader = build(str(tmp / "td_cache"))
    batches_iter = iter(loader)
    next(batches_iter)
    start = time.perf_counter()
    for _ in range(batches):
        next(batches_iter)
    results["torchdata_samples_per_s"] = batches * 16 / (time.perf_counter() - start)
    # Its state after 2 batches, with the sample counters moved to sample 1,000,000 (batches of 16).
    state = json.loads(json.dumps(loader.state_dict(), default=str))
    seen = (batches + 1) * 16

    def advance(node):
        if isinstance(node, dict):
            return {k: advance(v) for k, v in node.items()}
        if isinstance(node, list):
            return [advance(v) for v in node]
        if isinstance(node, int) and not isinstance(node, bool):
            return RESUME_AT if node == seen else RESUME_AT // 16 if node == batches + 1 else node
        return node

    resumed_state = loader.state_dict()
    resumed_state = {k: advance(v) if k != "_snapshot" else v for k, v in resumed_state.items()}
    del batches_iter, loader, state
    latencies = {0: [], RESUME_AT: []}
    for _ in range(repeats):
        for at in (0, RESUME_AT):
            start = time.perf_counter()
            fresh = build("")
            if at:
                fresh.load_state_dict(resumed_state)
            next(iter(fresh))
            latencies[at].append(time.perf_counter() - start)
            del fresh
    results["torchdata_first_batch_s_at_0"] = statistics.median(latencies[0])
    results["torchdata_first_batch_s_at_1M"] = statistics.median(latencies[RESUME_AT])
    results["torchdata_resume_latency_ratio"] = results["torchdata_first_batch_s_at_1M"] / results[
        "torchdata_first_batch_s_at_0"]
    return results


def packing_efficiency(root: Path, tokenizer, rows: int) -> float:
    from config import DataConfig, load_config
    from data.loader import StageLoader
    from model.registry import FLAVORS
    from storage import LocalStorage

    stage = load_config(["recipe=debug"]).curriculum.stages["joint_pretrain"]
    stage.seq_len, stage.micro_batch_size = 8192, 1
    loader = StageLoader("joint_pretrain", stage, DataConfig(prefetch_samples=0), LocalStorage(root), tokenizer,
                         FLAVORS["debug"].vision, 0, (0, 1))
    real = total = 0
    for step in range(rows):
        batch = loader.next_packed_batch(step / rows)
        real += int((batch.input_ids != tokenizer.pad_id).sum())
        total += batch.input_ids.numel()
    return real / total


# megatron-energon 7.4.1 keeps torch but pulls s3fs/aiobotocore, which would downgrade botocore under our boto3:
# it runs from a venv of its own, made on first use.
ENERGON_VENV = Path.home() / ".cache" / "kimi-vl-bench" / "energon-venv"
ENERGON_PACKAGES = (["torch==2.13.0"], ["megatron-energon==7.4.1"])  # torch first: a bare one pulls a CUDA build


def energon_python(given: str, venv: Path) -> tuple[str, str]:
    """(interpreter, error): the given one, or the venv's, made (a few minutes, once) when it has no energon."""
    if given:
        return given, ""
    python = venv / "bin" / "python"
    if not (venv / "bin" / "energon").exists():
        try:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
            for packages in ENERGON_PACKAGES:
                subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True, capture_output=True,
                               timeout=1800)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            detail = getattr(error, "stderr", b"") or b""
            return "", (f"could not make energon's venv in {venv} ({error}: {detail.decode(errors='replace')[-300:]}); "
                        f"give --energon-python, the interpreter of a venv with torch==2.13.0 and "
                        f"megatron-energon==7.4.1")
    return str(python), ""


ENERGON_LOADER = '''def sample_loader(raw: dict) -> dict:
    meta = raw["json"]
    caption = meta.get("caption") or ", ".join(o["label"] for o in meta.get("objects", []))
    return dict(__sources__=raw.get("__sources__"), image=raw["0.png"], caption=caption)


def part_filter(part: str) -> bool:
    return part in ("0.png", "json")
'''
ENERGON_RUN = '''
import json, statistics, sys, time
from megatron.energon import WorkerConfig, get_train_dataset, get_savable_loader
path, batches, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def build():
    config = WorkerConfig(rank=0, world_size=1, num_workers=2)
    return get_savable_loader(get_train_dataset(path, batch_size=16, shuffle_buffer_size=64,
                                                max_samples_per_sequence=64, worker_config=config))
loader = build()
batches_iter = iter(loader)
first_captions = [str(c) for c in getattr(next(batches_iter), "caption", None) or []]
start = time.perf_counter()
for _ in range(batches):
    next(batches_iter)
rate = batches * 16 / (time.perf_counter() - start)
state = loader.save_state_rank()
del batches_iter, loader
latencies = {0: [], 1: []}
for _ in range(repeats):
    for resumed in (0, 1):
        start = time.perf_counter()
        fresh = build()
        if resumed:
            fresh.restore_state_rank(state)
        next(iter(fresh))
        latencies[resumed].append(time.perf_counter() - start)
        del fresh
print(json.dumps({"rate": rate, "at_0": statistics.median(latencies[0]), "at_resume": statistics.median(latencies[1]),
                  "resume_at": (batches + 1) * 16, "first_captions": first_captions}))
'''


def energon_figures(python: str, root: Path, tmp: Path, batches: int, repeats: int) -> dict:
    """megatron-energon (in its own venv) on local copies of the same image-text shards, 2 workers."""
    import shutil

    dataset = tmp / "energon"
    for source in SOURCES:
        shutil.copytree(root / source, dataset / source, ignore=shutil.ignore_patterns("*.json"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    energon = str(Path(python).parent / "energon")
    subprocess.run([energon, "prepare", str(dataset), "--non-interactive", "--split-ratio", "1,0,0",
                    "--sample-type", "CaptioningSample"], check=True, capture_output=True, env=env, timeout=600)
    (dataset / ".nv-meta" / "sample_loader.py").write_text(ENERGON_LOADER)
    done = subprocess.run([python, "-c", ENERGON_RUN, str(dataset), str(batches), str(repeats)], capture_output=True,
                          text=True, env=env, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"energon_error": f"energon run failed: {done.stderr[-500:]}"}
    figures = json.loads(lines[-1])
    captions = figures.get("first_captions", [])
    require_equal("energon's first batch: samples", len(captions), 16)
    unknown = [c for c in captions if c not in corpus_captions(root)]
    require("energon's first batch: captions", not unknown, f"not in the corpus: {unknown[:3]}")
    return {"energon_samples_per_s": figures["rate"], "energon_first_batch_s_at_0": figures["at_0"],
            "energon_first_batch_s_at_resume": figures["at_resume"], "energon_resume_at_sample": figures["resume_at"],
            "energon_resume_latency_ratio": figures["at_resume"] / figures["at_0"],
            "energon_storage": "local copies of the same shards (its S3 path needs a multi-storage-client profile)",
            "energon_resume_note": "energon's state cannot be moved to sample 1,000,000 without iterating there"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.5)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--rows", type=int, default=24, help="8K rows for packing efficiency")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--resume-repeats", type=int, default=15,
                        help="first batches of our loader at each start point (their times vary 0.08-0.3 s)")
    parser.add_argument("--photos", type=int, default=160, help="1024x768 JPEG samples for the large-image figure")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="our loader's worker processes (data.loader_workers; 0: prefetch threads only)")
    parser.add_argument("--energon-python", default=os.environ.get("ENERGON_PYTHON", ""),
                        help="python of a venv with megatron-energon==7.4.1 (it cannot share ours); default: the "
                             "--energon-venv one, made on first use")
    parser.add_argument("--energon-venv", type=Path, default=ENERGON_VENV)
    parser.add_argument("--no-energon", action="store_true", help="skip megatron-energon")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(name, "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    from data.synthetic import generate_corpus
    from data.tokenizer import TextTokenizer
    from storage import LocalStorage, S3Options, S3Storage

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        root = tmp / "demo"
        generate_corpus(root, seed=0, scale=args.scale)
        tokenizer = TextTokenizer.from_file(root / "tokenizer.json")
        server, endpoint = start_s3(root)
        try:
            url = f"s3://{BUCKET}/demo"
            check_baselines(url, endpoint, tokenizer, root, tmp)
            result = ours(url, endpoint, tokenizer, args.batches, tmp, args.repeats, args.workers,
                          shard_images(LocalStorage(root), SOURCES), args.resume_repeats)
            result["throughput_vs_decode_floor"] = result["loader_samples_per_s"] / result[
                "decode_floor_samples_per_s"]
            result.update(read_ceiling(url, endpoint, tokenizer, str(tmp / "cache"), max(args.workers, 1),
                                       args.repeats, shard_images(LocalStorage(root), SOURCES)))
            result["loader_vs_read_ceiling"] = result["throughput_vs_decode_floor"] / result[
                "read_ceiling_vs_decode_floor"]
            if args.photos:
                photos_url = photos(tmp, endpoint, args.photos)
                storage = S3Storage(photos_url, S3Options(endpoint_url=endpoint))
                photo_tokenizer = TextTokenizer.from_bytes(storage.read("tokenizer.json"))
                figures = samples_per_s(photos_url, endpoint, photo_tokenizer, str(tmp / "photo_cache"),
                                        args.batches, ("photos",), args.workers, args.repeats,
                                        shard_images(storage, ("photos",)))
                result["photos_decode_floor_samples_per_s"] = figures["floor"]
                result["photos_loader_samples_per_s"] = figures["loader"]
                result["photos_throughput_vs_decode_floor"] = result["photos_loader_samples_per_s"] / result[
                    "photos_decode_floor_samples_per_s"]
            result["resume_latency_ratio"] = result["first_batch_s_at_1M"] / result["first_batch_s_at_0"]
            result["packing_efficiency"] = packing_efficiency(root, tokenizer, args.rows)
            tokenizer_json = (root / "tokenizer.json").read_text()
            result.update(torchdata_figures(url, endpoint, tokenizer_json, args.batches, tmp, args.repeats))
            if "torchdata_samples_per_s" in result:
                result["torchdata_throughput_vs_decode_floor"] = result["torchdata_samples_per_s"] / result[
                    "decode_floor_samples_per_s"]
            if args.no_energon:
                result["energon_error"] = "skipped (--no-energon)"
            else:
                python, error = energon_python(args.energon_python, args.energon_venv)
                result.update(energon_figures(python, root, tmp, args.batches, args.repeats) if python
                              else {"energon_error": error})
            if "energon_samples_per_s" in result:
                result["energon_throughput_vs_decode_floor"] = result["energon_samples_per_s"] / result[
                    "decode_floor_samples_per_s"]
        finally:
            server.terminate()
            server.wait()
    result = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
    result["config"] = {"scale": args.scale, "batches": args.batches, "batch": 16, "sources": list(SOURCES),
                        "photos": args.photos, "cpus": os.cpu_count(), "loader_workers": args.workers,
                        "prefetch_samples": PREFETCH_SAMPLES, "prefetch_threads": 4}
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
