"""The zig-zag context-parallel layout: a row of ``S`` tokens is cut into ``2 * cp`` equal chunks and rank ``r``
holds chunks ``r`` and ``2 * cp - 1 - r``, pairing an early (cheap under causal attention) chunk with a late one."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ZigzagLayout"]


@dataclass(frozen=True)
class ZigzagLayout:
    """Where the tokens of ``rows`` packed rows of ``seq_len`` tokens live on ``cp_degree`` ranks."""

    rows: int
    seq_len: int
    cp_degree: int

    def __post_init__(self):
        if self.seq_len % (2 * self.cp_degree):
            raise ValueError(f"sequence length {self.seq_len} is not divisible by 2 x cp_degree = "
                             f"{2 * self.cp_degree}")

    @property
    def chunk(self) -> int:
        return self.seq_len // (2 * self.cp_degree)

    def chunk_starts(self, cp_rank: int) -> list[int]:
        """Global flat index of the first token of each local chunk, in local order (row by row, two per row)."""
        pair = (cp_rank, 2 * self.cp_degree - 1 - cp_rank)
        return [row * self.seq_len + c * self.chunk for row in range(self.rows) for c in pair]

    def local_indices(self, cp_rank: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """``int64 [rows * seq_len / cp]`` on ``device``: the global flat index of every local token, in local
        order."""
        offsets = torch.arange(self.chunk, device=device)
        return torch.cat([start + offsets for start in self.chunk_starts(cp_rank)])

    def shard(self, tensor: torch.Tensor, cp_rank: int) -> torch.Tensor:
        """This rank's tokens of a ``[rows, seq_len, ...]`` tensor, as ``[rows, seq_len / cp, ...]``."""
        flat = tensor.reshape(self.rows * self.seq_len, *tensor.shape[2:])
        local = flat[self.local_indices(cp_rank, tensor.device)]
        return local.view(self.rows, self.seq_len // self.cp_degree, *tensor.shape[2:])
