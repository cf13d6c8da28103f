"""The batch formats, defined once. Everything between the loader and the model speaks these two types.

``PackedBatch`` (decoder stages: ``vit_align`` onwards)
    Documents are packed back to back into ``rows`` of exactly ``seq_len`` tokens (static shapes for pipeline and
    context parallelism). The end of a row that no document fills is one padding document with no loss.

    ============================  =====================  ==========================================================
    field                         shape / dtype          meaning
    ============================  =====================  ==========================================================
    ``input_ids``                 [rows, seq_len] int64  token ids; image placeholders hold ``<|image|>``
    ``labels``                    [rows, seq_len] int64  next-token target of each position (within its document)
    ``loss_mask``                 [rows, seq_len] bool   True where ``labels`` counts in the loss
    ``position_ids``              [rows, seq_len] int64  position inside its own document, restarting at 0
    ``cu_seqlens``                [docs + 1] int32       document boundaries over the flattened rows x seq_len tokens
                                                         (flash-attn varlen convention; rows never share a document)
    ``pixel_values``              [patches, p*p*C] u8    all images' patches, image after image, each row-major over
                                                         its patch grid, each patch flattened as (p, p, C): raw RGB,
                                                         normalized by the model on its device (a quarter of the
                                                         bytes of float32 to copy between processes and to the GPU)
    ``image_grid_hw``             [images, 2] int64      patch grid (height, width) of each image, same order
    ``image_token_positions``     [image_tokens] int64   flattened (row * seq_len + column) positions of the
                                                         placeholders, in the order the projector emits merged
                                                         tokens: image after image, row-major over the merged grid
    ``source_ids``                [rows, seq_len] int16  host only: the data source of each position's document, as
                                                         an index in the stage's sorted sources
                                                         (:func:`~data.mixture.mixture_sources`), -1 on padding
    ============================  =====================  ==========================================================

    Each image yields ``(h / m) * (w / m)`` placeholder tokens, ``m`` the merge size (2).

``ImageTextBatch`` (``vit_coca``)
    Image-text pairs for the CoCa objective: the images are packed NaViT-style exactly as above; the texts are padded
    to a common length.

    ``pixel_values``, ``image_grid_hw`` as above; ``text_ids`` [images, text_len] int64 (bos ... eos, then pad) and
    ``text_mask`` [images, text_len] bool (True on real tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

# Index metadata: small, read on the host (document and image boundaries drive Python loops and kernel arguments),
# so it stays on the CPU when a batch moves to its device. Everything else is device data.
HOST_FIELDS = frozenset({"cu_seqlens", "image_grid_hw", "source_ids"})


def _moved(batch, move):
    """A copy of ``batch`` with ``move`` applied to its device data (index metadata stays as it is). The token
    counts are taken along, counted where the batch is now (on the host), so the step never waits for the device."""
    copy = type(batch)(**{f.name: getattr(batch, f.name) if f.name in HOST_FIELDS else move(getattr(batch, f.name))
                          for f in fields(batch)})
    copy._host_counts = (batch.num_loss_tokens, batch.num_tokens)
    return copy


@dataclass
class PackedBatch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_hw: torch.Tensor
    image_token_positions: torch.Tensor
    source_ids: torch.Tensor | None = None  # None: unknown (batches not made by the loader)

    @property
    def num_loss_tokens(self) -> int:
        counts = self.__dict__.get("_host_counts")
        return int(self.loss_mask.sum()) if counts is None else counts[0]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """The batch on ``device`` (``cu_seqlens`` and ``image_grid_hw`` stay on the host)."""
        return _moved(self, lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PackedBatch:
        """The batch with its device data in page-locked host memory (asynchronous copies to a GPU)."""
        return _moved(self, torch.Tensor.pin_memory)


@dataclass
class ImageTextBatch:
    pixel_values: torch.Tensor
    image_grid_hw: torch.Tensor
    text_ids: torch.Tensor
    text_mask: torch.Tensor
    # [pairs] int16, host only: each pair's data source (its index in the stage's sorted sources); None: unknown.
    source_ids: torch.Tensor | None = None

    @property
    def num_loss_tokens(self) -> int:
        # Caption loss is over next-token targets: every real text token but the first.
        counts = self.__dict__.get("_host_counts")
        return int(self.text_mask[:, 1:].sum()) if counts is None else counts[0]

    @property
    def num_tokens(self) -> int:
        counts = self.__dict__.get("_host_counts")
        return int(self.text_mask.sum()) + self.pixel_values.shape[0] if counts is None else counts[1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ImageTextBatch:
        """The batch on ``device`` (``image_grid_hw`` stays on the host)."""
        return _moved(self, lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> ImageTextBatch:
        """The batch with its device data in page-locked host memory (asynchronous copies to a GPU)."""
        return _moved(self, torch.Tensor.pin_memory)
