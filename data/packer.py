"""A rank's batches from its slots' reads: packed rows (the language-model objective) or image-text pairs (CoCa).

A row takes whole documents while they fit, then the head of the next one, whose rest opens the slot's next row; the
identity of that waiting document is part of the slot's state (:attr:`~data.planner.SlotStream.pending`), so a
resumed loader renders it again and continues the row stream exactly.
"""

from __future__ import annotations

from config.model import VisionArgs
from data.batch import ImageTextBatch, PackedBatch
from data.packing import PackedRow, RowBuilder, collate_image_text, collate_rows
from data.planner import SlotStream
from data.reader import Reader
from data.samples import Document, SampleError
from data.tokenizer import TextTokenizer

# A document continues into the next row only in pieces of at least this many tokens (shorter heads are padding).
MIN_PIECE_TOKENS = 16
# Documents are rendered up to this many rows long; the rest of a longer one is dropped.
MAX_ROWS_PER_DOCUMENT = 8


class Packer:
    """Packs and collates the reads of a rank's slots into batches.

    Args:
        reader: The slots' reads (documents, or image-text pairs).
        seq_len: Tokens per packed row.
        tokenizer: Its padding and image placeholder ids.
        vision: Patch and merge sizes of the batches' images.
    """

    def __init__(self, reader: Reader, seq_len: int, tokenizer: TextTokenizer, vision: VisionArgs):
        self.reader = reader
        self.seq_len = seq_len
        self.pad_id, self.image_id = tokenizer.pad_id, tokenizer.image_id
        self.patch_dim = vision.in_channels * vision.patch_size**2
        self.merge_size = vision.merge_size
        # Per-source loss: a source is named by its index in the stage's sorted sources (data.mixture.mixture_sources).
        self.source_names = tuple(sorted(reader.sources))
        self._source_index = {name: i for i, name in enumerate(self.source_names)}
        # Called with each row packed and each image-text pair read (see StageLoader.observe); None in training.
        self.observer = None
        # Per slot, the waiting document (SlotStream.pending) as rendered: a cache of a pure function of its identity.
        self._pending: dict[int, Document] = {}

    def forget(self) -> None:
        """Drop the rendered waiting documents (after a state is loaded: rendered again from their identities)."""
        self._pending.clear()

    def packed_batch(self, slots: list[SlotStream], progress: float) -> PackedBatch:
        """One packed row of ``seq_len`` tokens from each slot."""
        rows = [self._next_row(stream, progress) for stream in slots]
        if self.observer is not None:
            for stream, row in zip(slots, rows, strict=True):
                self.observer("row", stream.slot, row)
        return collate_rows(rows, self.image_id, self.patch_dim, self.merge_size)

    def image_text_batch(self, slots: list[SlotStream], progress: float) -> ImageTextBatch:
        """One (image, caption ids) pair from each slot."""
        pairs, sources = [], []
        for stream in slots:
            key, pair = self.reader.read_next(stream, progress)
            if self.observer is not None:
                self.observer("pair", stream.slot, key, pair)
            pairs.append(pair)
            sources.append(self._source_index[key[0]])
        return collate_image_text(pairs, self.pad_id, sources)

    def _waiting(self, stream: SlotStream, progress: float) -> Document:
        """The slot's waiting document: the next one read if none waits, rendered again if restored."""
        if stream.pending is None:
            key, self._pending[stream.slot] = self.reader.read_next(stream, progress)
            stream.pending = (*key, 0)
        elif stream.slot not in self._pending:  # restored from a checkpoint: rendering is a pure function
            self._pending[stream.slot] = self.reader.read(stream.pending[:4])
        return self._pending[stream.slot]

    def _next_row(self, stream: SlotStream, progress: float) -> PackedRow:
        """Fill one row: whole documents while they fit, then the head of the next one (never inside an image
        span; the rest opens the next row), so rows carry almost no padding and long documents are not lost."""
        builder = RowBuilder(self.seq_len, self.pad_id)
        while True:
            doc, offset = self._waiting(stream, progress), stream.pending[4]
            source, origin = self._source_index[stream.pending[0]], (stream.pending[:4], offset)
            if len(doc.tokens) - offset <= builder.free:
                builder.add(doc.piece(offset, len(doc.tokens)), source, origin)
                self._done(stream)
                continue
            cut = doc.split_point(offset, offset + builder.free)
            if cut - offset >= MIN_PIECE_TOKENS:
                builder.add(doc.piece(offset, cut), source, origin)
                stream.pending = (*stream.pending[:4], cut)
            elif builder.free == self.seq_len:  # an image span longer than a whole row: cannot be placed
                self.reader.skip(stream, stream.pending[:4],
                                 SampleError(f"an image of more than {self.seq_len} tokens; lower max_image_patches"))
                self._done(stream)
                continue
            return builder.finish()

    def _done(self, stream: SlotStream) -> None:
        stream.pending = None
        self._pending.pop(stream.slot, None)
