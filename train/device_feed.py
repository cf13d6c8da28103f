"""A stage's batches on the rank's device, the next step's copied while the current step runs.

On a GPU, host batches are put in page-locked memory and copied with ``non_blocking`` on a side CUDA stream: the
trainer asks for the next step's batches (:meth:`DeviceFeed.prefetch`) once the current step's forward and backward
are queued, so reading, pinning and the copy overlap the GPU's work; the compute stream waits for the copy only
when it uses the batches. On the CPU the batches are the loader's, unchanged, and nothing runs ahead.

The loader's state is the checkpoint's truth about what has been trained on. Batches taken ahead of a checkpoint are
not trained on yet, so the feed's state is the loader's *before* it handed them out: a resume draws them again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful

from data.batch import ImageTextBatch, PackedBatch
from data.loader import StageLoader

Batch = PackedBatch | ImageTextBatch

__all__ = ["DeviceFeed"]


@dataclass
class _Ahead:
    progress: float
    batches: list[Batch]
    loader_state: dict[str, Any]  # the loader's state before these batches were drawn
    ready: Any = None  # the side stream's event after the copy (CUDA)


class DeviceFeed(Stateful):
    """Hands out one step's micro-batches at a time on ``device``.

    Args:
        loader: The stage's loader.
        objective: ``lm`` (packed rows) or ``coca`` (image-text pairs).
        micro_batches: Micro-batches per optimizer step.
        device: The rank's device.
        look_ahead: Draw and copy the next step's batches ahead of time (default: on CUDA only).
    """

    def __init__(self, loader: StageLoader, objective: str, micro_batches: int, device: torch.device,
                 look_ahead: bool | None = None):
        self.loader = loader
        self.micro_batches = micro_batches
        self.device = torch.device(device)
        self._draw: Callable[[float], Batch] = (loader.next_image_text_batch if objective == "coca"
                                                 else loader.next_packed_batch)
        self.look_ahead = self.device.type == "cuda" if look_ahead is None else look_ahead
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._ahead: _Ahead | None = None

    def next_step(self, progress: float) -> list[Batch]:
        """The micro-batches of the step at ``progress`` (the share of the stage done), on the device."""
        ahead, self._ahead = self._ahead, None
        if ahead is None or ahead.progress != progress:
            if ahead is not None:  # drawn for another step: put the loader back where it was
                self.loader.load_state_dict(ahead.loader_state)
            ahead = self._fetch(progress)
        if ahead.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ahead.ready)
            for batch in ahead.batches:  # the compute stream now uses memory the side stream allocated
                for tensor in vars(batch).values():
                    if isinstance(tensor, torch.Tensor) and tensor.is_cuda:
                        tensor.record_stream(torch.cuda.current_stream(self.device))
        return ahead.batches

    def prefetch(self, progress: float) -> None:
        """Start drawing and copying the micro-batches of the step at ``progress`` (no-op without look-ahead)."""
        if self.look_ahead and self._ahead is None:
            self._ahead = self._fetch(progress)

    def _fetch(self, progress: float) -> _Ahead:
        state = self.loader.state_dict()
        host = [self._draw(progress) for _ in range(self.micro_batches)]
        if self._stream is None:
            return _Ahead(progress, [batch.to(self.device) for batch in host], state)
        with torch.cuda.stream(self._stream):
            batches = [batch.pin_memory().to(self.device, non_blocking=True) for batch in host]
            ready = torch.cuda.Event()
            ready.record(self._stream)
        return _Ahead(progress, batches, state, ready)

    def state_dict(self) -> dict[str, Any]:
        """The loader's state as of the batches handed out (batches drawn ahead are drawn again on resume)."""
        return self._ahead.loader_state if self._ahead is not None else self.loader.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._ahead = None
        self.loader.load_state_dict(state_dict)
