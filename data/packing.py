"""Packing documents into fixed-length rows and collating rows into a :class:`~data.batch.PackedBatch`."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from data.batch import ImageTextBatch, PackedBatch
from data.samples import Document, ImagePatches


@dataclass
class PackedRow:
    """One row of exactly ``seq_len`` tokens: whole documents back to back, then one padding document."""

    tokens: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    loss_mask: list[bool] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    doc_lens: list[int] = field(default_factory=list)
    images: list[ImagePatches] = field(default_factory=list)
    # Per position, the index of its document's data source (-1: padding or unknown).
    sources: list[int] = field(default_factory=list)
    # Per document piece: (its draw's key, first and end token of the piece in the document, first column in the row,
    # its images' (width, height) and patch grids); recorded when the packer is told where pieces come from.
    pieces: list[tuple[tuple, int, int, int, list]] = field(default_factory=list)


class RowBuilder:
    """Fills one row with documents (the loader decides what goes in: whole documents or pieces of one)."""

    def __init__(self, seq_len: int, pad_id: int):
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.row = PackedRow()

    @property
    def free(self) -> int:
        return self.seq_len - len(self.row.tokens)

    def fits(self, doc: Document) -> bool:
        return len(doc.tokens) <= self.free

    def add(self, doc: Document, source: int = -1, origin: tuple[tuple, int] | None = None) -> None:
        """Append a document: its labels are the next tokens of the same document, never of the next one.

        Args:
            doc: The document (or a piece of one).
            source: Index of its data source (per-source loss).
            origin: ``(draw key, offset of the piece in its document)``, recorded in :attr:`PackedRow.pieces`.
        """
        n = len(doc.tokens)
        if n > self.free:
            raise ValueError(f"document of {n} tokens does not fit the {self.free} free positions of the row")
        row = self.row
        if origin is not None:
            images = [(img.size, img.grid) for img in doc.images]
            row.pieces.append((origin[0], origin[1], origin[1] + n, len(row.tokens), images))
        row.sources += [source] * n
        row.tokens += doc.tokens
        row.labels += doc.tokens[1:] + [self.pad_id]
        row.loss_mask += doc.supervised[1:] + [False]
        row.positions += list(range(n))
        row.doc_lens.append(n)
        row.images += doc.images

    def finish(self) -> PackedRow:
        """Pad the rest of the row as one loss-free document and start a new row."""
        row, pad = self.row, self.free
        if pad:
            row.tokens += [self.pad_id] * pad
            row.labels += [self.pad_id] * pad
            row.loss_mask += [False] * pad
            row.positions += list(range(pad))
            row.sources += [-1] * pad
            row.doc_lens.append(pad)
        self.row = PackedRow()
        return row


def collate_rows(rows: list[PackedRow], image_id: int, patch_dim: int, merge_size: int) -> PackedBatch:
    """Stack rows into the batch format; placeholders are located by token id, row after row."""
    input_ids = torch.tensor([r.tokens for r in rows], dtype=torch.long)
    doc_lens = [n for r in rows for n in r.doc_lens]
    cu_seqlens = torch.zeros(len(doc_lens) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(doc_lens, dtype=torch.int32), 0)
    images = [img for r in rows for img in r.images]
    pixel_values = (concat_rows([img.patches for img in images]) if images
                    else torch.zeros(0, patch_dim, dtype=torch.uint8))
    grid_hw = torch.tensor([img.grid for img in images], dtype=torch.long).view(-1, 2)
    positions = torch.nonzero(input_ids.view(-1) == image_id).view(-1)
    expected = sum((h // merge_size) * (w // merge_size) for h, w in grid_hw.tolist())
    if positions.numel() != expected:
        raise ValueError(f"{positions.numel()} image placeholders in the rows but the images make {expected} tokens")
    return PackedBatch(
        input_ids=input_ids,
        labels=torch.tensor([r.labels for r in rows], dtype=torch.long),
        loss_mask=torch.tensor([r.loss_mask for r in rows], dtype=torch.bool),
        position_ids=torch.tensor([r.positions for r in rows], dtype=torch.long),
        cu_seqlens=cu_seqlens,
        pixel_values=pixel_values,
        image_grid_hw=grid_hw,
        image_token_positions=positions,
        source_ids=torch.tensor([r.sources for r in rows], dtype=torch.int16),
    )


def concat_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(tensors)``, without a copy when they are back-to-back pieces of one contiguous buffer (the
    images of a worker's chunk, when its samples make up the batch in order); the result then shares their memory."""
    first = tensors[0]
    storage = first.untyped_storage()  # once: a storage object per tensor would cost more than the check
    trailing, dtype = first.shape[1:], first.dtype
    address, rows = first.data_ptr(), 0
    for tensor in tensors:
        if not (tensor.data_ptr() == address and tensor.is_contiguous() and tensor.dtype == dtype
                and tensor.shape[1:] == trailing):
            return torch.cat(tensors)
        address += tensor.numel() * tensor.element_size()
        rows += tensor.shape[0]
    if address > storage.data_ptr() + storage.nbytes():  # back to back, but past the first one's buffer
        return torch.cat(tensors)
    return first.new_empty(0).set_(storage, first.storage_offset(), (rows, *trailing))


def collate_image_text(pairs: list[tuple[ImagePatches, list[int]]], pad_id: int,
                       source_ids: list[int] | None = None) -> ImageTextBatch:
    """Pack the images NaViT-style and pad the texts to the longest one; ``source_ids``: each pair's source."""
    lengths = [len(ids) for _, ids in pairs]
    # The mask first, then every id in one numpy pass over its True places (row-major: each text left-aligned):
    # a third of the time of converting padded Python rows with torch.tensor.
    text_mask = np.arange(max(lengths)) < np.array(lengths)[:, None]
    text_ids = np.full(text_mask.shape, pad_id, dtype=np.int64)
    text_ids[text_mask] = np.fromiter(itertools.chain.from_iterable(ids for _, ids in pairs), dtype=np.int64,
                                      count=sum(lengths))
    return ImageTextBatch(
        pixel_values=concat_rows([img.patches for img, _ in pairs]),
        image_grid_hw=torch.tensor([img.grid for img, _ in pairs], dtype=torch.long),
        text_ids=torch.from_numpy(text_ids),
        text_mask=torch.from_numpy(text_mask),
        source_ids=None if source_ids is None else torch.tensor(source_ids, dtype=torch.int16),
    )
