"""Context parallelism: each packed row is split over the ``cp`` ranks of a context-parallel group.

Layout (zig-zag load balancing): a row of ``S`` tokens is cut into ``2 * cp`` equal chunks and rank ``r`` holds
chunks ``r`` and ``2 * cp - 1 - r``. Under causal attention the cost of a chunk grows with its position, so pairing
an early chunk with a late one gives every rank the same work.

Order of operations in a step (see :func:`forward_context_parallel`):

1. every rank of the group embeds the *whole* rows, images included: vision features are scattered into their
   placeholder positions before the sequence is cut, so no image is ever split. The images are divided among the
   context ranks (balanced by patches); each encodes its own and the projected tokens are all-gathered, so the
   tower's work and activations are split, not repeated. Gradients: each rank back-propagates only its own tokens'
   loss, the gather's backward brings every rank's share to the image's owner, and the optimizer's sum over data x
   context ranks completes it;
2. the embeddings, position ids, labels and loss mask are sharded by the zig-zag layout (RoPE uses the original
   per-document positions, so rotations are unchanged);
3. every decoder attention core is swapped (by module name) for :class:`ContextParallelAttention`, which brings
   every rank's keys and values to the local queries, either all at once (``allgather``: an autograd-aware
   all-gather whose backward reduce-scatters) or one block at a time around a ring (``ring``:
   :mod:`parallel.ring_attention`, partial results merged by log-sum-exp), so document masks and causality are exact
   across chunk and rank boundaries;
4. the loss is a sum over local tokens divided by the global token count: summed over ranks, it is the token mean
   one process computes.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from config.schema import CP_METHODS
from model.attention import DocumentAttention, document_bounds, document_lengths, prefix_causal_attention
from parallel.ring_attention import plan_ring, ring_attention
from parallel.zigzag import ZigzagLayout

__all__ = ["CP_METHODS", "ContextParallelAttention", "apply_context_parallel", "assign_images",
           "embed_inputs_context_parallel", "forward_context_parallel"]


def _all_gather(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    # Functional and differentiable (the backward reduce-scatters): selective checkpointing keeps its output.
    return funcol.wait_tensor(funcol.all_gather_single_autograd(x.contiguous(), 0, group))


class ContextParallelAttention(nn.Module):
    """Drop-in for :class:`~model.attention.DocumentAttention` on sequence-sharded inputs, by one of two methods:

    * ``allgather``: one all-gather brings every rank's keys and values (differentiable: the backward
      reduce-scatters). They are put in global order, and each local chunk of each document attends to its
      document's keys up to itself with :func:`~model.attention.prefix_causal_attention` (bottom-right aligned
      causal attention of the chunk over the document's prefix): fused kernels, no ``Tq x Tk`` mask or scores. Keys
      and values of the whole sequence are held at once.
    * ``ring``: :func:`~parallel.ring_attention.ring_attention`: ``cp`` steps around the ring, each attending the
      local queries to the one remote block held (shifted on while it is used) and merging by log-sum-exp; only
      blocks that share a document with the queries and lie in their past are computed, the diagonal causally. Keys
      and values of at most two blocks are held at once, forward and backward (which runs the ring again).

    Args:
        causal: Causal attention within documents.
        group: The context-parallel group.
        seq_len: Tokens per packed row (the stage's sequence length): fixes the layout of the local tokens.
        method: ``allgather`` or ``ring``.
    """

    def __init__(self, causal: bool, group: dist.ProcessGroup, seq_len: int, method: str = "allgather"):
        super().__init__()
        if method not in CP_METHODS:
            raise ValueError(f"unknown context-parallel attention '{method}': allowed are {CP_METHODS}")
        self.causal = causal
        self.group = group
        self.seq_len = seq_len
        self.method = method

    # Eager inside compiled blocks (parallel/compile.py), like the core it replaces: a loop over chunks and
    # documents on host metadata, around collectives.
    @torch.compiler.disable
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                scale: float | None = None) -> torch.Tensor:
        """Attention of the local queries ``q [T_local, H, D]`` against every rank's keys and values.

        Args:
            q, k, v: This rank's tokens, in :class:`ZigzagLayout` local order.
            cu_seqlens: ``int32 [docs + 1]`` document boundaries over the *global* flattened rows.
            scale: Softmax scale (``1 / sqrt(D)`` when None).
        """
        cp, cp_rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        local_tokens = q.shape[0]
        layout = ZigzagLayout(rows=local_tokens * cp // self.seq_len, seq_len=self.seq_len, cp_degree=cp)
        covered = document_bounds(cu_seqlens)[-1]
        if layout.rows * self.seq_len != local_tokens * cp or covered != local_tokens * cp:
            raise ValueError(f"{local_tokens} local tokens on {cp} context ranks do not form rows of {self.seq_len} "
                             f"tokens covered by cu_seqlens (ending at {covered})")
        boundaries = [0, *itertools.accumulate(document_lengths(cu_seqlens))]
        if self.method == "ring":
            plans = plan_ring(layout, cp_rank, tuple(boundaries), self.causal)
            return ring_attention(q, k, v, plans, self.group, scale)
        dv = v.shape[-1]
        if dv < q.shape[-1]:  # one head dim for q, k and v keeps attention on the fused kernels (see attention.py)
            v = F.pad(v, (0, q.shape[-1] - dv))
        block = torch.cat((k, v), dim=-1)
        gathered = _all_gather(block, self.group)
        gathered_order = torch.cat([layout.local_indices(rank, block.device) for rank in range(cp)])
        keys, values = gathered[torch.argsort(gathered_order)].split(q.shape[-1], dim=-1)
        outputs = []
        for index, start in enumerate(layout.chunk_starts(cp_rank)):
            local_start = index * layout.chunk
            outputs += self._attend_chunk(q[local_start : local_start + layout.chunk], keys, values, start,
                                          boundaries, scale)
        return torch.cat(outputs)[..., :dv]

    def _attend_chunk(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int,
                      boundaries: list[int], scale: float | None) -> list[torch.Tensor]:
        # The chunk covers global tokens [start, end); each document overlapping it attends from the document's
        # first token to the chunk's last (causal: the chunk's queries are the last positions of those keys) or to
        # the document's end.
        end = start + q.shape[0]
        pieces = []
        for doc_start, doc_end in zip(boundaries[:-1], boundaries[1:]):
            q_start, q_end = max(start, doc_start), min(end, doc_end)
            if q_start >= q_end:
                continue
            chunk_q = q[q_start - start : q_end - start]
            if self.causal:
                pieces.append(prefix_causal_attention(chunk_q, keys[doc_start:q_end], values[doc_start:q_end], scale))
                continue
            qd, kd, vd = (t.transpose(0, 1)[None] for t in (chunk_q, keys[doc_start:doc_end],
                                                              values[doc_start:doc_end]))
            pieces.append(F.scaled_dot_product_attention(qd, kd, vd, scale=scale)[0].transpose(0, 1))
        return pieces


def apply_context_parallel(model: nn.Module, group: dist.ProcessGroup | None, seq_len: int,
                           method: str = "allgather") -> int:
    """Swap every causal attention core (the decoder's) for :class:`ContextParallelAttention` over ``group``, or
    back to :class:`DocumentAttention` when ``group`` is None or has one rank, in place.

    Called at the start of each stage (the sequence length and the stage's degree fix the layout); the vision
    tower's bidirectional cores stay as they are, since images are embedded whole before the sequence is cut.

    Returns:
        The number of attention cores swapped.
    """
    sharded = group is not None and dist.get_world_size(group) > 1
    swapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, (DocumentAttention, ContextParallelAttention)) and module.causal:
            parent_name, _, child = name.rpartition(".")
            core = ContextParallelAttention(True, group, seq_len, method) if sharded else DocumentAttention(True)
            setattr(model.get_submodule(parent_name), child, core)
            swapped += 1
    return swapped


def assign_images(patches_per_image: list[int], ranks: int) -> list[int]:
    """The context rank that encodes each image: largest first to the least loaded rank (by patches), ties to the
    lowest rank; a pure function of the sizes, so every rank computes the same assignment."""
    owner = [0] * len(patches_per_image)
    load = [0] * ranks
    for image in sorted(range(len(patches_per_image)), key=lambda i: (-patches_per_image[i], i)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owner[image] = rank
        load[rank] += patches_per_image[image]
    return owner


def embed_inputs_context_parallel(model: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                                  image_grid_hw: torch.Tensor | None, image_token_positions: torch.Tensor | None,
                                  group: dist.ProcessGroup) -> torch.Tensor:
    """``model.embed_inputs`` (a :class:`~model.vlm.KimiVL`) of whole rows with the vision work split over the
    context-parallel ranks (:func:`_embed_images_context_parallel`). The result equals ``embed_inputs`` on one rank.
    """
    def embed_images(pixels: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
        return _embed_images_context_parallel(model, pixels, grids, group)

    return model.embed_inputs(input_ids, pixel_values, image_grid_hw, image_token_positions, embed_images)


def _embed_images_context_parallel(model: nn.Module, pixel_values: torch.Tensor, image_grid_hw: torch.Tensor,
                                   group: dist.ProcessGroup) -> torch.Tensor:
    """``model.embed_images`` with the images divided among the context-parallel ranks.

    Each rank encodes only its images (:func:`assign_images`, balanced by patches) and the projected image tokens
    are all-gathered (differentiable: the backward sums every rank's gradient into the owner's), so the tower's
    activations and compute are divided by ``cp`` instead of repeated on every rank.

    Returns:
        Every image's tokens ``[image tokens, hidden]`` in the projector's order, in the token embedding's dtype.
    """
    cp, cp_rank = dist.get_world_size(group), dist.get_rank(group)
    merge = model.args.vision.merge_size ** 2
    patches = (image_grid_hw[:, 0] * image_grid_hw[:, 1]).tolist()
    owner = assign_images(patches, cp)
    starts = [0, *itertools.accumulate(patches)]
    mine = [i for i in range(len(patches)) if owner[i] == cp_rank]
    tokens_of = [p // merge for p in patches]
    table = model.decoder.embed_tokens.weight
    width = table.shape[1]
    # Every rank contributes a block padded to the largest rank's token count (all-gather needs equal sizes).
    per_rank = [sum(tokens_of[i] for i in range(len(patches)) if owner[i] == r) for r in range(cp)]
    local = table.new_zeros(max(per_rank), width)
    if mine:
        rows = torch.cat([torch.arange(starts[i], starts[i + 1], device=pixel_values.device) for i in mine])
        encoded = model.embed_images(pixel_values[rows], image_grid_hw[mine])
        local = torch.cat((encoded.to(table.dtype), local[encoded.shape[0]:]))
    # Every rank of the group must take part in the gather's backward (a reduce-scatter), also one that encoded no
    # image: its block joins the graph whenever the vision side trains, or the others would wait for it forever.
    trains_vision = any(p.requires_grad for part in (model.vision, model.projector) for p in part.parameters())
    if torch.is_grad_enabled() and trains_vision and not local.requires_grad:
        local.requires_grad_()
    gathered = _all_gather(local, group).view(cp, max(per_rank), width)
    # Back to the projector's order (image after image) that image_token_positions follows.
    pieces, used = [], [0] * cp
    for image, rank in enumerate(owner):
        pieces.append(gathered[rank, used[rank] : used[rank] + tokens_of[image]])
        used[rank] += tokens_of[image]
    return torch.cat(pieces)


def context_parallel_share(per_position: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's positions of a ``[rows, seq, ...]`` per-position tensor: the zigzag share its hidden states
    cover under context parallelism over ``group`` (what :func:`forward_context_parallel` returns labels for)."""
    rows, seq_len = per_position.shape[:2]
    return ZigzagLayout(rows, seq_len, dist.get_world_size(group)).shard(per_position, dist.get_rank(group))


def forward_context_parallel(model: nn.Module, batch, group: dist.ProcessGroup):
    """Final hidden states and labels of this rank's tokens of a :class:`~data.batch.PackedBatch` under context
    parallelism (the loss applies the output projection, fused with the cross-entropy).

    Returns:
        ``(hidden [B, S / cp, H], labels [B, S / cp], loss_mask [B, S / cp], MoEAux)``.
    """
    cp, cp_rank = dist.get_world_size(group), dist.get_rank(group)
    rows, seq_len = batch.input_ids.shape
    layout = ZigzagLayout(rows, seq_len, cp)
    embeds = embed_inputs_context_parallel(model, batch.input_ids, batch.pixel_values, batch.image_grid_hw,
                                           batch.image_token_positions, group)
    hidden, aux = model.decoder(position_ids=layout.shard(batch.position_ids, cp_rank), cu_seqlens=batch.cu_seqlens,
                                inputs_embeds=layout.shard(embeds, cp_rank))
    return hidden, context_parallel_share(batch.labels, group), context_parallel_share(batch.loss_mask, group), aux
