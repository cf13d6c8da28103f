"""The per-draw read (:class:`~data.sample_reader.SampleReader`) in spawned worker processes.

:class:`ProcessReader` runs the read in spawned worker processes (spawned, not forked: the trainer has threads,
process groups and possibly CUDA, none of which survive a fork) for when decoding and resizing need more than one
core. Workers cut patches straight into a shared-memory arena the reader owns (no per-tensor shared-memory handles
cross the process boundary); the loader's output is the same with any number of workers.
"""

from __future__ import annotations

import collections
import math
import multiprocessing
import os
import pickle
import sys
import threading
import time
import weakref
from concurrent.futures import Future
from multiprocessing import shared_memory
from multiprocessing.reduction import ForkingPickler

import cv2
import numpy as np
import torch

from data.sample_reader import Drawn, SampleReader
from data.samples import Document, ImagePatches

# Shared-memory bytes per concurrent read; a sample whose patches do not fit goes through the pipe instead.
SLOT_BYTES = 16 * 1024 * 1024


def _serve(connection, arena_name: str, slot_bytes: int) -> None:
    """A worker process: reads its :class:`SampleReader` from the pipe, then answers ``(keys, slot)`` requests with
    their outcomes until it reads ``None``."""
    torch.set_num_threads(1)  # one core per worker: the workers are the parallelism
    cv2.setNumThreads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    arena = shared_memory.SharedMemory(name=arena_name)
    try:
        reader = pickle.loads(connection.recv_bytes())
        connection.send(READY)
        while (request := connection.recv()) is not None:
            keys, slot = request
            connection.send(_load_chunk(reader, arena, keys, slot * slot_bytes, (slot + 1) * slot_bytes))
    except (EOFError, KeyboardInterrupt):  # the loader went away (or the job is being stopped): nothing to answer
        pass
    finally:
        try:
            arena.close()
        except BufferError:  # stopped mid-chunk, its patch views still alive: the mapping goes with the process
            pass


def _load_chunk(reader: SampleReader, arena: shared_memory.SharedMemory, keys: list[tuple[str, int, int, int]],
                start: int, end: int) -> list:
    """The reads of ``keys``, their patches in the arena's bytes ``[start, end)`` as (offset, shape) where they fit:
    cut straight into it (one copy less of every image than cutting them elsewhere first), in the order read."""
    memory = np.frombuffer(arena.buf, dtype=np.uint8)
    placed: dict[int, int] = {}  # address of a patch buffer in the arena -> its offset
    cursor = start

    def patch_buffer(count: int) -> np.ndarray | None:
        nonlocal cursor
        if cursor + count > end:
            return None  # the slot is full: fresh memory, through the pipe
        buffer = memory[cursor:cursor + count]
        placed[buffer.ctypes.data] = cursor
        cursor += count
        return buffer

    outcomes = []
    for drawn in reader.read_many(keys, patch_buffer):
        if isinstance(drawn, Exception):
            outcomes.append(drawn)
            continue
        shipped = []
        for image in _images(drawn):
            offset = placed.get(image.patches.data_ptr())
            if offset is not None and image.patches.is_contiguous():
                shipped.append(ImagePatches((offset, tuple(image.patches.shape)), image.grid, image.size))
            else:  # not cut into the slot (it was full): through the pipe
                shipped.append(ImagePatches(image.patches.numpy(), image.grid, image.size))
        outcomes.append(_with_images(drawn, shipped))
    return outcomes


def _images(drawn: Drawn) -> list[ImagePatches]:
    return drawn.images if isinstance(drawn, Document) else [drawn[0]]


def _with_images(drawn: Drawn, images: list[ImagePatches]) -> Drawn:
    if isinstance(drawn, Document):
        return Document(drawn.tokens, drawn.supervised, images, drawn.spans)
    return images[0], drawn[1]


class WorkerError(RuntimeError):
    """A loader worker process could not start, or died (killed, out of memory, a crash in a native decoder)."""


# What a worker answers once it has read its payload and can serve.
READY = "ready"
# A worker that has not read its payload this long after it was spawned (alive, but stuck before it could serve)
# is stopped and named: importing the main module and torch takes seconds, not minutes.
WORKER_START_SECONDS = 120.0


def _main_module_hint() -> str:
    """Why a spawned worker may die before it starts: it imports the main script again first."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or not os.path.isfile(path):
        return ""
    try:
        with open(path, encoding="utf-8", errors="replace") as source:
            guarded = "__main__" in source.read()
    except OSError:
        guarded = True
    if guarded:
        return (f"; spawned workers import the main script {path} again before they start: code that starts loader "
                "workers must run only under its `if __name__ == \"__main__\":` guard")
    return (f"; the main script {path} has no `if __name__ == \"__main__\":` guard, and spawned workers import it "
            "again before they start (so it starts workers of its own there and fails): put the script's work "
            "under that guard")


# Requests queued at each worker: while it works on one, the next waits in its pipe, so it never idles between
# round trips (the caller's side of a trip -- unpickling, copying out, sending the next keys -- takes the trainer's
# GIL, which its own thread may hold for milliseconds); with one request at a time, a worker would wait out each
# of those round trips.
REQUESTS_PER_WORKER = 2


class _Worker:
    """One worker process, its pipe, and its requests in flight (answered in order): (future, arena slot)."""

    def __init__(self, connection, process):
        self.connection, self.process = connection, process
        self.in_flight: collections.deque[tuple[Future, int]] = collections.deque()
        # Its payload (the reader) sent: requests may follow it down the pipe.
        self.ready = False
        self.timed_out = False


def _stop(processes: list, threads: list[threading.Thread]) -> None:
    """Stop worker processes and wait for their answer threads, which then see their pipes close."""
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=5)
    for thread in threads:
        if thread is not threading.current_thread():
            thread.join(timeout=5)


def _fail(future: Future, message: str) -> None:
    """Fail a request in flight, or a queued one unless it was withdrawn."""
    if future.running() or future.set_running_or_notify_cancel():
        future.set_exception(WorkerError(message))


class ProcessReader:
    """:meth:`SampleReader.read_many` in ``processes`` spawned workers, as futures (:meth:`submit`) or blocking
    (:meth:`read`, :meth:`read_many`).

    Requests wait in one queue; each worker has up to :data:`REQUESTS_PER_WORKER` of them in its pipe. A thread
    per worker reads its answers, copies their patches out of shared memory, resolves their futures, and sends the
    next queued request into the freed place. No thread sits between a caller and the workers: a pool thread per
    request, or an executor's queues, feeder and management threads, cost the trainer's process more per trip
    than pickling a chunk's keys and token ids. Read several samples per request to spread its cost. Patches come
    back through a shared-memory arena with one slot per request in flight (a pipe would copy them four times, in
    chunks of its buffer, which costs more than decoding a small image).
    """

    def __init__(self, reader: SampleReader, processes: int, slot_bytes: int = SLOT_BYTES):
        slots = processes * REQUESTS_PER_WORKER
        self.arena = shared_memory.SharedMemory(create=True, size=slots * slot_bytes)
        self.closed = False
        self.broken = ""  # why no more requests can be served (a dead worker, or closed)
        self.lock = threading.Lock()  # the queue, the free slots and every worker's requests in flight
        self.queue: collections.deque[tuple[list, Future]] = collections.deque()
        self.free_slots = list(range(slots))
        context = multiprocessing.get_context("spawn")
        self.processes, self.workers, self.threads = [], [], []
        # The reader (tokenizer included, often well over a pipe's 64 KiB) goes down each worker's own pipe once it
        # runs, never as a Process argument: Process.start() writes its arguments into a pipe whose read end it
        # keeps open itself until the write ends, so a child that dies before reading them (e.g. a script without a
        # main guard, run again in the child) blocks the start forever.
        payload = bytes(ForkingPickler.dumps(reader))
        for _ in range(processes):
            ours, theirs = context.Pipe()
            process = context.Process(target=_serve, args=(theirs, self.arena.name, slot_bytes),
                                      name="loader-worker", daemon=True)
            try:
                process.start()
            except Exception as error:  # noqa: BLE001 (anything that stops a spawn: named, the others stopped)
                ours.close()
                theirs.close()
                _stop(self.processes, self.threads)
                self.arena.unlink()
                reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
                raise WorkerError(f"cannot start a loader worker process: {reason}{_main_module_hint()}") from None
            theirs.close()
            self.processes.append(process)
            worker = _Worker(ours, process)
            self.workers.append(worker)
            thread = threading.Thread(target=self._receive, args=(worker, payload), name="loader-worker-answers",
                                      daemon=True)
            thread.start()
            self.threads.append(thread)
            timer = threading.Timer(WORKER_START_SECONDS, self._start_timeout, (worker,))
            timer.daemon = True
            timer.start()
        # Daemon threads die where they stand when the interpreter finalizes; one freeing a tensor then (torch gives
        # up the GIL to free it) aborts the process ("terminate called without an active exception", exit code
        # 134), which a loader left open risks at every exit. So a reader never closed is closed at exit, before
        # that: its processes stopped and its threads joined.
        self._stop = weakref.finalize(self, _stop, self.processes, self.threads)

    def submit(self, keys: list[tuple[str, int, int, int]], urgent: bool = False) -> Future:
        """A future of the reads of ``keys`` (a list of :meth:`SampleReader.read` results or the exceptions they
        raised), served in the order asked for, ``urgent`` ones first. Cancelling it before a worker takes it
        withdraws it."""
        future: Future = Future()
        with self.lock:
            if self.broken:
                future.set_exception(WorkerError(self.broken))
                return future
            if urgent:
                self.queue.appendleft((keys, future))
            else:
                self.queue.append((keys, future))
            self._dispatch()
        return future

    def read_many(self, keys: list[tuple[str, int, int, int]]) -> list[Drawn | Exception]:
        """The reads of ``keys`` in one round trip to a worker, ahead of the reads queued: each a
        :meth:`SampleReader.read` result or the exception it raised."""
        return self.submit(keys, urgent=True).result()

    def read(self, name: str, position: int, draw: int, cap: int) -> Drawn:
        outcome = self.read_many([(name, position, draw, cap)])[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _dispatch(self) -> None:
        """Send queued requests to the workers with a free place, least busy first (under the lock)."""
        while self.queue and self.free_slots and not self.broken:
            ready = [w for w in self.workers if w.ready]
            if not ready:
                return
            worker = min(ready, key=lambda w: len(w.in_flight))
            if len(worker.in_flight) >= REQUESTS_PER_WORKER:
                return
            keys, future = self.queue.popleft()
            if not future.set_running_or_notify_cancel():  # withdrawn while queued
                continue
            slot = self.free_slots.pop()
            worker.in_flight.append((future, slot))
            try:
                worker.connection.send((keys, slot))
            except (OSError, EOFError):
                pass  # it died: its answer thread fails the requests in flight, this one with them

    def _start_timeout(self, worker: _Worker) -> None:
        if not worker.ready and worker.process.is_alive():
            worker.timed_out = True
            worker.process.terminate()  # its pipe closes: the payload's send fails and names it

    def _receive(self, worker: _Worker, payload: bytes) -> None:
        try:
            # Fails as soon as the worker is gone (it holds the only other end of the pipe), whether it died before
            # the payload was sent or before it had read it: the worker says when it has.
            worker.connection.send_bytes(payload)
            if worker.connection.recv() != READY:
                raise EOFError
            with self.lock:
                worker.ready = True
                self._dispatch()
            while True:
                outcomes = worker.connection.recv()
                with self.lock:
                    future, slot = worker.in_flight.popleft()
                try:
                    outcomes = self._copy_out(outcomes)
                except BaseException as error:  # noqa: BLE001 (handed to the caller)
                    future.set_exception(error)
                else:
                    future.set_result(outcomes)
                finally:
                    with self.lock:
                        self.free_slots.append(slot)
                        self._dispatch()
                del outcomes, future  # no tensor held while waiting (see _stop)
        except (EOFError, OSError):  # the worker died, or was stopped by close()
            message = self._died(worker)
            with self.lock:
                self.broken = self.broken or message
                failed = [future for future, _ in worker.in_flight] + [future for _, future in self.queue]
                worker.in_flight.clear()
                self.queue.clear()
            for future in failed:
                _fail(future, self.broken)

    def _died(self, worker: _Worker) -> str:
        """Why no more requests can be served once a worker's pipe closed: closed, or its death (by exit code)."""
        if self.broken:
            return self.broken
        # Another thread may be joining it too (close()): then this join can return before that one has recorded
        # the code it reaped, so wait for the code itself.
        deadline = time.monotonic() + 2
        while worker.process.exitcode is None and time.monotonic() < deadline:
            worker.process.join(timeout=0.05)
        pid, code = worker.process.pid, worker.process.exitcode
        if worker.timed_out:
            return (f"loader worker process {pid} did not start within {WORKER_START_SECONDS:.0f} s (stopped)"
                    f"{_main_module_hint()}")
        if not worker.ready:
            return (f"loader worker process {pid} died (exit code {code}) before it started, before reading its "
                    f"payload (its own error, if any, is on stderr above){_main_module_hint()}")
        return f"loader worker process {pid} died (exit code {code}) with {len(worker.in_flight)} requests unanswered"

    def _copy_out(self, outcomes: list) -> list[Drawn | Exception]:
        """Patches left in the arena, as (offset, shape), copied out at once before the slot is reused (one copy
        for the request, not one per image: samples read together make one or more batches together, in order)."""
        placed = [image.patches for drawn in outcomes if not isinstance(drawn, BaseException)
                  for image in _images(drawn) if isinstance(image.patches, tuple)]
        if placed:  # in the order cut, usually; a patch buffer not shipped (e.g. a later image of a pair) is skipped
            start = min(offset for offset, _ in placed)
            end = max(offset + math.prod(shape) for offset, shape in placed)
            # Copied by numpy: torch's allocator takes fresh pages for each new buffer of this size (the last ones
            # are still held by batches in use) and faults them in one by one, several times slower.
            pixels = np.frombuffer(self.arena.buf, dtype=np.uint8, count=end - start, offset=start)
            chunk = torch.from_numpy(pixels.copy())
        for index, drawn in enumerate(outcomes):
            if isinstance(drawn, BaseException):
                continue
            images = []
            for image in _images(drawn):
                patches = image.patches
                if isinstance(patches, tuple):  # (offset, shape) in the arena
                    offset, shape = patches
                    patches = chunk[offset - start:offset - start + math.prod(shape)].view(shape)
                else:
                    patches = torch.from_numpy(patches)
                images.append(ImagePatches(patches, image.grid, image.size))
            outcomes[index] = _with_images(drawn, images)
        return outcomes

    def close(self) -> None:
        # A worker in the middle of a chunk would finish it (reads, and retries against a storage that may be
        # gone) long after the loader is done: stop the processes. Requests still queued or in flight fail (a
        # caller blocked forever would hold up the interpreter's exit).
        with self.lock:
            self.broken = self.broken or "the loader's worker processes were closed"
            queued = [future for _, future in self.queue]
            self.queue.clear()
        for future in queued:
            _fail(future, self.broken)
        self._stop()
        if not self.closed:
            # Only the name goes now: an answer thread whose join timed out may still be copying out of the arena,
            # so the mapping is released with this object, once no thread uses it.
            self.closed = True
            self.arena.unlink()
