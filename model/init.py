"""Layout-independent initialization: the value of every parameter is a function of the run's seed and its name.

Each parameter (and each expert of a stacked expert tensor) draws from a generator of its own, seeded by a hash of
``(seed, full parameter name[, global expert index])``. Nothing depends on which other parameters exist or in which
order they are initialized, so a rank that holds only part of the model (its experts under expert parallelism, its
decoder layers under pipeline parallelism) gives its parameters exactly the values one process gives the same
parameters of the whole model. Parallel runs and single-process references then start from the same weights, and
every parity test keeps its meaning.

The numbers are drawn by CPU generators whatever the parameter's device, so a GPU run starts from exactly the
weights of the CPU run of the same recipe (the CPU proofs and the GPU tier compare the same model). A parameter on
another device is drawn into a host buffer of its size and copied over: the host holds at most one parameter (or
one expert's matrix) at a time. Tensors on ``meta`` hold no values and are skipped.
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

    @torch.no_grad()
    def normal_(self, tensor: torch.Tensor, std: float, name: str) -> None:
        """Fill ``tensor`` (named ``name`` in this module) with ``normal(0, std)`` from its own generator."""
        _fill_normal(tensor, std, derive_seed(self.seed, self.key(name)))

    @torch.no_grad()
    def normal_experts_(self, tensor: torch.Tensor, std: float, name: str, first_expert: int = 0) -> None:
        """Fill a stacked expert tensor ``[local experts, ...]`` whose first slice is global expert ``first_expert``:
        every expert from a generator keyed by its global index, so its values do not depend on the sharding."""
        for local, matrix in enumerate(tensor.unbind(0)):
            _fill_normal(matrix, std, derive_seed(self.seed, f"{self.key(name)}#{first_expert + local}"))


def _fill_normal(tensor: torch.Tensor, std: float, seed: int) -> None:
    """``normal(0, std)`` from a CPU generator seeded with ``seed``, written into ``tensor`` wherever it lives."""
    if tensor.is_meta:
        return
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if tensor.device.type == "cpu" and tensor.dtype == torch.float32:
        tensor.normal_(0.0, std, generator=generator)
        return
    # Drawn in fp32 on the host whatever the parameter's device and dtype: a GPU or bf16 model starts from the CPU
    # fp32 model's values (rounded).
    host = torch.empty(tensor.shape, dtype=torch.float32, device="cpu").normal_(0.0, std, generator=generator)
    tensor.copy_(host)
