"""Layout-independent initialization: the value of every parameter is a function of the run's seed and its name.

Each parameter (and each expert of a stacked expert tensor) draws from a generator of its own, seeded by a hash of
``(seed, full parameter name[, global expert index])``. Nothing depends on which other parameters exist or in which
order they are initialized, so a rank that holds only part of the model (its experts under expert parallelism, its
decoder layers under pipeline parallelism) gives its parameters exactly the values one process gives the same
parameters of the whole model. Parallel runs and single-process references then start from the same weights, and
every parity test keeps its meaning.

Generators live on the parameter's device, so initialization runs where the parameters are (a CUDA generator on a
GPU). Values therefore depend on the device type as well: CPU and CUDA produce different (equally distributed)
numbers for the same seed. Tensors on ``meta`` hold no values and are skipped.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["ParamInit", "derive_seed"]


def derive_seed(seed: int, key: str) -> int:
    """A 63-bit generator seed from the run seed and a parameter key (stable across processes and Python runs)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class ParamInit:
    """Initializes tensors by name under a prefix (the module's path from the model's root).

    Args:
        seed: The run's seed.
        prefix: Dotted path of the module whose tensors this initializer names (empty: the root).
    """

    def __init__(self, seed: int, prefix: str = ""):
        self.seed = int(seed)
        self.prefix = prefix

    @classmethod
    def from_global_rng(cls) -> ParamInit:
        """An initializer whose seed is drawn from torch's global generator (``torch.manual_seed(s)`` then a build
        gives the same weights every time)."""
        return cls(int(torch.randint(0, 2**62, (1,), device="cpu")))

    def child(self, name: str) -> ParamInit:
        """The initializer of submodule ``name`` (``""``: this module)."""
        if not name:
            return self
        return ParamInit(self.seed, f"{self.prefix}.{name}" if self.prefix else name)

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def generator(self, key: str, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(derive_seed(self.seed, key))

    @torch.no_grad()
    def normal_(self, tensor: torch.Tensor, std: float, name: str) -> None:
        """Fill ``tensor`` (named ``name`` in this module) with ``normal(0, std)`` from its own generator."""
        if tensor.is_meta:
            return
        tensor.normal_(0.0, std, generator=self.generator(self.key(name), tensor.device))

    @torch.no_grad()
    def normal_experts_(self, tensor: torch.Tensor, std: float, name: str, first_expert: int = 0) -> None:
        """Fill a stacked expert tensor ``[local experts, ...]`` whose first slice is global expert ``first_expert``:
        every expert from a generator keyed by its global index, so its values do not depend on the sharding."""
        if tensor.is_meta:
            return
        for local, matrix in enumerate(tensor.unbind(0)):
            key = f"{self.key(name)}#{first_expert + local}"
            matrix.normal_(0.0, std, generator=self.generator(key, tensor.device))
