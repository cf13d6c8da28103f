"""Context-parallel attention on forked gloo ranks equals one process, and the ring holds one key/value block at a time.

Packed documents of several lengths (one crossing several chunk boundaries, a one-token one, one filling a whole row)
are sharded by the zig-zag layout; every rank attends its queries and back-propagates a weighted sum of its outputs.
The outputs, the summed loss and the gradients of q, k and v must equal :func:`~model.attention.varlen_attention` of
the whole rows in one process (fp32). The ring runs on each of its kernels: the CPU flash op, the explicit fallback,
and the CUDA flash-attn varlen call, whose packing (``cu_seqlens``, the ``[H, total_q]`` log-sum-exp, the backward
from the global output and log-sum-exp) runs here against a CPU emulation of the kernel's contract.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import parallel.ring_attention as ring
from model.attention import varlen_attention
from parallel.context import ContextParallelAttention
from parallel.zigzag import ZigzagLayout
from tests.forked import run_ranks

ROWS, SEQ, HEADS, DIM, VALUE_DIM = 2, 32, 2, 8, 6  # MLA-like: values narrower than queries and keys
LENGTHS = [5, 14, 1, 12, 3, 29]  # row 0: 5 | 14 (crosses chunk boundaries at cp2 and cp4) | 1 | 12; row 1: 3 | 29
SCALE = 0.3
# Measured: at most 4.6e-7 relative, any case (summation order only).
TOLERANCE = 1e-6


@pytest.fixture(scope="module", autouse=True)
def imported_once():
    """What the ranks would each import lazily (the functional collectives load torch._dynamo, a dispatch mode its
    machinery: seconds per rank), imported in the parent that forks them."""
    import torch._dynamo  # noqa: F401

    with LargestTensors():
        torch.ones(1).add(1)


def tensors(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k ``[ROWS, SEQ, H, D]``, v and the loss weights ``[ROWS, SEQ, H, Dv]``."""
    generator = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(ROWS, SEQ, HEADS, DIM, generator=generator) for _ in range(2))
    v, weights = (torch.randn(ROWS, SEQ, HEADS, VALUE_DIM, generator=generator) for _ in range(2))
    return q, k, v, weights


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


def one_process(causal: bool, lengths: list[int]) -> dict:
    q, k, v, weights = (t.flatten(0, 1) for t in tensors())
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = varlen_attention(q, k, v, cu_seqlens(lengths), causal, SCALE)
    loss = (out * weights).sum()
    loss.backward()
    return {"out": out.detach(), "loss": loss.detach(), "q": q.grad, "k": k.grad, "v": v.grad}


# ------------------------------------------------------------------------------- the CUDA kernel, emulated on CPU


def emulated_flash_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, causal, return_debug_mask, *, scale):
    """``aten::_flash_attention_forward`` on packed varlen inputs: ``out [total_q, H, D]`` and the log-sum-exp
    ``[H, total_q]`` fp32, one sequence per ``cu_seqlens`` entry (causal masks bottom-right aligned)."""
    spans = check_varlen_call(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, causal)
    outs, lses = [], []
    for (qa, qb), (ka, kb) in spans:
        out, lse = ring.cpu_flash_forward(*(t[a:b].transpose(0, 1)[None] for t, a, b in
                                            ((q, qa, qb), (k, ka, kb), (v, ka, kb))), 0.0, causal, scale=scale)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    EMULATED.append("forward")
    return torch.cat(outs), torch.cat(lses, dim=1), torch.empty(2), torch.empty(()), torch.empty(0)


def emulated_flash_backward(grad, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout_p, causal, rng, unused, *,
                            scale):
    spans = check_varlen_call(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, causal)
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32 and out.shape == q.shape
    grads = []
    for (qa, qb), (ka, kb) in spans:
        views = [t[a:b].transpose(0, 1)[None] for t, a, b in
                 ((grad, qa, qb), (q, qa, qb), (k, ka, kb), (v, ka, kb), (out, qa, qb))]
        grads.append(ring.cpu_flash_backward(*views, lse[None, :, qa:qb].contiguous(), 0.0, causal, scale=scale))
    EMULATED.append("backward")
    return tuple(torch.cat([g[i][0].transpose(0, 1) for g in grads]) for i in range(3))


def check_varlen_call(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, causal) -> list:
    """The kernel's contract: int32 ``cu_seqlens`` covering the packed tokens, their true maxima, one head dim."""
    assert cu_q.dtype == cu_k.dtype == torch.int32 and dropout_p == 0.0
    assert q.dim() == k.dim() == v.dim() == 3 and q.shape[-1] == k.shape[-1] == v.shape[-1]
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    assert bounds_q[-1] == q.shape[0] and bounds_k[-1] == k.shape[0] == v.shape[0]
    spans = list(zip(itertools.pairwise(bounds_q), itertools.pairwise(bounds_k), strict=True))
    assert max_q == max(b - a for a, b in itertools.pairwise(bounds_q))
    assert max_k == max(b - a for a, b in itertools.pairwise(bounds_k))
    if causal:  # the ring's causal blocks are square: bottom-right and top-left alignment agree
        assert all(qb - qa == kb - ka for (qa, qb), (ka, kb) in spans)
    return spans


EMULATED: list[str] = []


def use_kernel(kernel: str) -> None:
    """Force the ring's kernel (in a forked rank): ``cpu`` (the default here), ``math`` or ``flash`` (emulated)."""
    ring._kernel = lambda q: kernel
    if kernel == "flash":
        ring.flash_varlen_forward, ring.flash_varlen_backward = emulated_flash_forward, emulated_flash_backward


# ----------------------------------------------------------------------------------------------------- parity


def attention_rank(rank: int, world: int, method: str, causal: bool, kernel: str, lengths: list[int]) -> dict:
    use_kernel(kernel)
    layout = ZigzagLayout(ROWS, SEQ, world)
    q, k, v, weights = (layout.shard(t, rank).flatten(0, 1) for t in tensors())
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    core = ContextParallelAttention(causal, dist.group.WORLD, SEQ, method)
    out = core(q, k, v, cu_seqlens(lengths), scale=SCALE)
    loss = (out * weights).sum()
    loss.backward()
    return {"out": out.detach(), "loss": loss.detach(), "q": q.grad, "k": k.grad, "v": v.grad,
            "emulated": list(EMULATED)}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


CASES = {  # name: (cp, method, causal, kernel)
    "cp2_ring": (2, "ring", True, "cpu"),
    "cp4_ring": (4, "ring", True, "cpu"),
    "cp4_ring_bidirectional": (4, "ring", False, "cpu"),
    "cp4_ring_flash_varlen": (4, "ring", True, "flash"),
    "cp2_ring_explicit_fallback": (2, "ring", True, "math"),
    "cp2_allgather": (2, "allgather", True, "cpu"),
    "cp4_allgather": (4, "allgather", True, "cpu"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_context_parallel_attention_equals_one_process(case):
    cp, method, causal, kernel = CASES[case]
    reference = one_process(causal, LENGTHS)
    results = run_ranks(attention_rank, cp, method, causal, kernel, LENGTHS)
    layout = ZigzagLayout(ROWS, SEQ, cp)
    loss = sum(result["loss"] for result in results)
    assert abs(float(loss - reference["loss"])) <= TOLERANCE * abs(float(reference["loss"]))
    for name in ("out", "q", "k", "v"):
        got = torch.cat([result[name] for result in results])
        want = reference[name][torch.cat([layout.local_indices(r) for r in range(cp)])]
        error = relative_error(got, want)
        assert error <= TOLERANCE, f"{case}: {name} differs by {error:.2e} (relative)"
    if kernel == "flash":  # the packed varlen calls ran, forward and backward, on every rank
        assert all({"forward", "backward"} <= set(result["emulated"]) for result in results)


# ----------------------------------------------------------------------------------------------------- memory


class LargestTensors(TorchDispatchMode):
    """The largest tensor (elements) any op takes or makes, and the most keys an attention kernel is given."""

    KERNELS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
               torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default}

    def __init__(self):
        super().__init__()
        self.elements = 0
        self.keys = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten((args, kwargs, out))[0]:
            if isinstance(t, torch.Tensor):
                self.elements = max(self.elements, t.numel())
        if func in self.KERNELS:  # [1, H, keys, D]
            key = args[1] if func._overloadpacket is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu \
                else args[2]
            self.keys = max(self.keys, key.shape[2])
        return out


def memory_rank(rank: int, world: int, method: str) -> dict:
    # One document per row: every query's past spans the whole row, the worst case for holding keys.
    layout = ZigzagLayout(ROWS, SEQ, world)
    q, k, v, weights = (layout.shard(t, rank).flatten(0, 1) for t in tensors())
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    core = ContextParallelAttention(True, dist.group.WORLD, SEQ, method)
    with LargestTensors() as forward:
        out = core(q, k, v, cu_seqlens([SEQ] * ROWS), scale=SCALE)
    with LargestTensors() as backward:
        torch.autograd.grad(out, (q, k, v), weights)
    return {"forward": (forward.elements, forward.keys), "backward": (backward.elements, backward.keys)}


@pytest.mark.parametrize("method", ["ring", "allgather"])
def test_the_ring_holds_one_key_value_block_at_a_time(method):
    """No tensor of the ring's forward or backward is larger than one rank's key/value block, and no kernel call
    sees more keys than a block holds; the all-gather (the twin) holds the whole rows, and so did the ring that
    gathered every block before attending."""
    cp = 4
    block_tokens = ROWS * SEQ // cp
    block_elements = block_tokens * HEADS * (DIM + VALUE_DIM)  # keys and values side by side, as the ring sends them
    results = run_ranks(memory_rank, cp, method)
    elements = {phase: [result[phase][0] for result in results] for phase in ("forward", "backward")}
    keys = {phase: [result[phase][1] for result in results] for phase in ("forward", "backward")}
    for phase in ("forward", "backward"):
        if method == "ring":
            # the largest tensor is the block the ring passes on (keys and values side by side)
            assert max(elements[phase]) == block_elements, f"{phase}: tensors of {elements[phase]} elements"
            assert max(keys[phase]) <= block_tokens, f"{phase}: kernels saw {keys[phase]} keys"
        else:
            assert max(elements[phase]) >= cp * block_elements and max(keys[phase]) > block_tokens
