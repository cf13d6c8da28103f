"""Expert parallelism: the routed experts of every MoE layer sharded over an expert-parallel group, tokens moved to
their experts and back with ``all_to_all_single`` (uneven splits; dropless: every assignment is computed).

The model's :class:`~model.moe.MoE` sorts its ``(token, expert)`` assignments by expert and hands them to
``moe.experts(rows, tokens_per_expert)`` for *all* ``E`` experts. Here that module is swapped, by name, for an
:class:`ExpertParallelExperts` holding only this rank's ``E / ep`` consecutive experts (parameter names unchanged,
``[E / ep, out, in]``):

1. dispatch: the counts per expert are exchanged (one small all-to-all), then each rank sends every destination the
   rows of that destination's experts (all-to-all with uneven splits);
2. the received rows, ordered by source rank, are regrouped by local expert and run through one grouped GEMM;
3. combine: the inverse permutation and the inverse all-to-all bring each row back to the rank and position it came
   from, where the MoE weights and sums it as before.

Both all-to-alls are autograd functions (the backward of a dispatch is the inverse exchange), so the gradient of an
expert's weights is the sum over every token routed to it from any rank of the group: exactly what one process
computes. Expert gradients then need a reduction over the *expert-data* group only (the ranks holding the same
experts), which the ZeRO optimizer does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from model.moe import GroupedExperts, MoE

__all__ = ["ExpertParallelExperts", "all_to_all", "apply_expert_parallel"]


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int],
               group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` along dim 0: rank ``r`` sends ``input_splits[r']`` rows of ``x`` to each
    ``r'`` and receives ``output_splits[r']`` rows from each; the backward is the exchange in the other direction.

    A functional collective (it returns a new tensor), so selective activation checkpointing can keep its output
    instead of re-issuing the exchange during the backward.
    """
    return funcol.wait_tensor(funcol.all_to_all_single_autograd(x.contiguous(), output_splits, input_splits, group))


def regroup_by_expert(received: torch.Tensor, total: int) -> torch.Tensor:
    """The permutation that reorders rows received from every source (source-major, each source's rows sorted by
    local expert) into expert-major order (each local expert's rows, source by source).

    Args:
        received: ``int64 [sources, local_experts]`` rows each source sent for each local expert.
        total: Their sum (known on the host from the exchange's splits).

    Returns:
        ``int64 [rows]`` indices into the received rows.
    """
    lengths = received.reshape(-1)
    starts = torch.cumsum(lengths, 0) - lengths  # start of segment (source, expert), source-major
    by_expert_lengths = received.t().reshape(-1)
    by_expert_starts = starts.view_as(received).t().reshape(-1)
    first_out = torch.cumsum(by_expert_lengths, 0) - by_expert_lengths
    return (torch.arange(total, device=received.device)
            + torch.repeat_interleave(by_expert_starts - first_out, by_expert_lengths))


class ExpertParallelExperts(GroupedExperts):
    """This rank's shard of a :class:`~model.moe.GroupedExperts`, dispatching over an expert-parallel group.

    Built where ``full`` lives: on ``meta`` (the device path: nothing is allocated, the shard is initialized after
    ``to_empty``), or from materialized weights, whose slice of this rank is copied.

    Args:
        full: The layer's experts (all ``E``).
        group: The expert-parallel group (``ep`` ranks).
    """

    def __init__(self, full: GroupedExperts, group: dist.ProcessGroup):
        num_experts, hidden_dim, dim = full.w_gate.shape
        ep, ep_rank = dist.get_world_size(group), dist.get_rank(group)
        if num_experts % ep:
            raise ValueError(f"{num_experts} experts do not divide over {ep} expert-parallel ranks")
        local = num_experts // ep
        with torch.device(full.w_gate.device):
            super().__init__(local, dim, hidden_dim)
        self.to(full.w_gate.dtype)
        self.group = group
        self.ep_degree = ep
        self.num_global_experts = num_experts
        # The global index of this rank's first expert: initialization, optimizer-state keys and checkpoints use
        # global indices, so a state saved at one expert-parallel degree loads at another.
        self.expert_offset = ep_rank * local
        shard = slice(self.expert_offset, self.expert_offset + local)
        with torch.no_grad():
            for name in ("w_gate", "w_up", "w_down"):
                if not full.w_gate.is_meta:
                    getattr(self, name).copy_(getattr(full, name)[shard])
                getattr(self, name).requires_grad_(getattr(full, name).requires_grad)

    # Eager inside compiled blocks (parallel/compile.py), like the experts it replaces: the exchange sizes are read
    # on the host (the all-to-all splits), so the received rows have a data-dependent count.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Compute the rows ``x`` (sorted by global expert, ``tokens_per_expert`` ``[E]`` on ``x``'s device) on
        whichever rank holds each expert; returns them in the order given."""
        if tokens_per_expert.shape != (self.num_global_experts,):
            raise ValueError(f"tokens_per_expert has shape {list(tokens_per_expert.shape)}, expected "
                             f"[{self.num_global_experts}] (one count per expert of the layer).")
        local = self.w_gate.shape[0]
        sent = tokens_per_expert.view(self.ep_degree, local)
        received = funcol.wait_tensor(funcol.all_to_all_single(sent, None, None, self.group))  # counts: no grad
        # The exchange sizes must be known on the host (all-to-all splits): the one wait of a dispatch.
        input_splits, output_splits = torch.stack((sent.sum(1), received.sum(1))).tolist()
        rows = all_to_all(x, output_splits, input_splits, self.group)
        order = regroup_by_expert(received, sum(output_splits))
        out = super().forward(rows[order], received.sum(0))
        back = out[torch.argsort(order)]  # inverse permutation: rows in the order they arrived
        return all_to_all(back, input_splits, output_splits, self.group)


def apply_expert_parallel(model: nn.Module, group: dist.ProcessGroup) -> int:
    """Shard the routed experts of every MoE layer of ``model`` over ``group``, in place (by module name).

    Args:
        model: A model holding :class:`~model.moe.MoE` layers (before the optimizer is built).
        group: The expert-parallel group.

    Returns:
        The number of MoE layers sharded.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, MoE) and not isinstance(module.experts, ExpertParallelExperts):
            module.experts = ExpertParallelExperts(module.experts, group)
            count += 1
    return count


def expert_offset(model: nn.Module, param_name: str) -> int:
    """The global index of the first expert of the stacked expert parameter ``param_name`` (0 unless sharded)."""
    module_name = param_name.rpartition(".")[0]
    return getattr(model.get_submodule(module_name), "expert_offset", 0)
