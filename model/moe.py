"""DeepSeek-V3 mixture of experts: sigmoid router, aux-loss-free bias balancing, routed + shared SwiGLU experts.

Routing of a token ``h``:

* ``scores = sigmoid(W_router h)`` (fp32), one affinity per routed expert;
* the ``k`` experts are chosen by top-k of ``scores + expert_bias``. The bias only steers the *choice*: it is a
  buffer nudged after each step towards uniform load (:meth:`MoE.update_expert_bias`), never trained by gradients;
* the combine weights are the unbiased ``scores`` of the chosen experts, normalized to sum 1 (``norm_topk_prob``)
  and multiplied by ``routed_scaling_factor``.

The output is ``sum_k weight_k * expert_k(h) + shared(h)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from config.model import DecoderArgs
from model.init import ParamInit
from model.layers import SwiGLU, init_default_weights

__all__ = ["GroupedExperts", "MoE", "RoutingResult", "grouped_mm_supported"]


class GroupedExperts(nn.Module):
    """The routed SwiGLU experts as stacked 3-D weights.

    Dim 0 indexes the expert, so expert parallelism shards it and Muon orthogonalizes each ``[out, in]`` matrix on
    its own.

    Args:
        num_experts: Number of routed experts ``E``.
        dim: Model hidden size.
        hidden_dim: Expert FFN size.
    """

    def __init__(self, num_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w_up = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w_down = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))

    @torch.no_grad()
    def init_weights(self, std: float, init: ParamInit) -> None:
        """``normal(0, std)`` for every expert, keyed by its global index: an expert-parallel shard (whose first
        expert is ``expert_offset``) holds the same values as the whole stack."""
        first = getattr(self, "expert_offset", 0)
        for name in ("w_gate", "w_up", "w_down"):
            init.normal_experts_(getattr(self, name), std, name, first)

    # Eager inside compiled blocks (parallel/compile.py), at a graph break: the grouped GEMM has no fake-tensor
    # kernel outside bf16 (its shape function follows CUDA's contract), the looped fallback reads the counts on the
    # host, and the GEMMs are library calls a compiler would not fuse anyway.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Run the experts on token rows already sorted by expert.

        Args:
            x: ``[assignments, dim]``, the rows of expert 0 first, then expert 1, ...
            tokens_per_expert: ``int64 [local experts]`` rows of each expert, on ``x``'s device (the grouped GEMM
                reads it there, so the step never waits for the host).

        Returns:
            ``[assignments, dim]`` expert outputs in the same order.
        """
        if tokens_per_expert.shape != (self.w_gate.shape[0],):
            raise ValueError(f"tokens_per_expert has shape {list(tokens_per_expert.shape)}, expected "
                             f"[{self.w_gate.shape[0]}] (one count per local expert).")
        if grouped_mm_supported(x):
            return self._forward_grouped(x, tokens_per_expert)
        return self._forward_looped(x, tokens_per_expert.tolist())

    def _forward_grouped(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        # One grouped GEMM per projection: every expert multiplies its own contiguous row slice, with no Python
        # loop and no per-expert weight slicing (whose backward would write a zero-filled [E, out, in] gradient
        # for every expert). Each row sees the same dot products as in the loop, so results match it bit for bit
        # on CPU.
        offsets = tokens_per_expert.cumsum(0, dtype=torch.int32)
        gate = F.grouped_mm(x, self.w_gate.transpose(-2, -1), offs=offsets)
        up = F.grouped_mm(x, self.w_up.transpose(-2, -1), offs=offsets)
        return F.grouped_mm(F.silu(gate) * up, self.w_down.transpose(-2, -1), offs=offsets)

    def _forward_looped(self, x: torch.Tensor, tokens_per_expert: list[int]) -> torch.Tensor:
        # Fallback (dtypes or devices without a grouped GEMM kernel). ``unbind`` once instead of indexing
        # ``w[expert]`` per expert: its backward stacks the per-expert gradients in one go. An expert without rows
        # multiplies an empty slice (no branch on the counts, so symbolic sizes trace through it).
        for count in tokens_per_expert:
            torch._check(count >= 0)
        torch._check(sum(tokens_per_expert) == x.shape[0])
        weights = zip(self.w_gate.unbind(0), self.w_up.unbind(0), self.w_down.unbind(0), strict=True)
        outputs = [(F.silu(rows @ w_gate.t()) * (rows @ w_up.t())) @ w_down.t()
                   for rows, (w_gate, w_up, w_down) in zip(x.split(tokens_per_expert), weights, strict=True)]
        return torch.cat(outputs)


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """Whether ``F.grouped_mm`` has a kernel for ``x``: CPU in fp32/bf16/fp16, CUDA in bf16 (Ampere or newer);
    ``meta`` follows CUDA's contract (bf16), as its shape functions do."""
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if x.device.type == "meta":
        return x.dtype == torch.bfloat16
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return False


@dataclass
class RoutingResult:
    """What the router decided for ``T`` tokens: ``indices``/``weights`` ``[T, k]`` and the fp32 ``scores [T, E]``."""

    scores: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor


class MoE(nn.Module):
    """Routed experts + shared experts of one decoder layer.

    Args:
        dim: Model hidden size.
        args: Decoder hyper-parameters (expert counts, sizes, routing constants).
    """

    def __init__(self, dim: int, args: DecoderArgs):
        super().__init__()
        self.top_k = args.num_experts_per_token
        self.norm_topk_prob = args.norm_topk_prob
        self.routed_scaling_factor = args.routed_scaling_factor
        self.bias_update_rate = args.bias_update_rate
        self.aux_loss_enabled = args.aux_loss_coef > 0
        self.router = nn.Linear(dim, args.num_routed_experts, bias=False)
        # Persistent (checkpointed) but not a parameter: aux-loss-free balancing moves it by a sign rule.
        self.register_buffer("expert_bias", torch.zeros(args.num_routed_experts, dtype=torch.float32))
        self.experts = GroupedExperts(args.num_routed_experts, dim, args.moe_ffn_size)
        self.shared_experts = SwiGLU(dim, args.moe_ffn_size * args.num_shared_experts)

    @torch.no_grad()
    def init_weights(self, std: float, init: ParamInit | None = None) -> None:
        """Initialize every parameter; the balancing bias starts at zero.

        Args:
            std: Standard deviation of the weight matrices.
            init: The initializer named at this module (None: seeded from torch's global generator).
        """
        init = init or ParamInit.from_global_rng()
        init_default_weights(self, std, init)  # router and shared experts
        self.experts.init_weights(std, init.child("experts"))
        self.expert_bias.zero_()

    def route(self, x: torch.Tensor) -> RoutingResult:
        """Choose ``k`` experts per token of ``x [T, dim]`` and their combine weights."""
        scores = torch.sigmoid(F.linear(x.float(), self.router.weight.float()))
        indices = torch.topk(scores + self.expert_bias, self.top_k, dim=-1).indices
        weights = scores.gather(-1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return RoutingResult(scores, indices, weights * self.routed_scaling_factor)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Apply the layer to ``x [B, S, dim]``.

        Returns:
            ``(out [B, S, dim], expert_load [E] detached fp32 token counts, aux_loss)``; ``aux_loss`` is the
            unweighted sequence-level balance loss (averaged over the B rows) when ``aux_loss_coef > 0``, else None.
        """
        rows, seq, dim = x.shape
        flat = x.reshape(rows * seq, dim)
        routing = self.route(flat)
        num_experts = self.expert_bias.shape[0]
        assigned = routing.indices.reshape(-1)  # [T * k], token t's choices at t*k .. t*k+k-1
        # Tokens per expert, on the device (a scatter, not bincount: its output shape is static, so it also runs on
        # meta and fake tensors).
        counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device).scatter_add_(
            0, assigned, torch.ones_like(assigned))
        # Sort the (token, expert) assignments by expert so each expert sees one contiguous slice; stable for a
        # deterministic order within an expert.
        order = torch.argsort(assigned, stable=True)
        token_of = order // self.top_k
        expert_out = self.experts(flat[token_of], counts)
        weighted = expert_out * routing.weights.reshape(-1)[order].unsqueeze(-1).to(expert_out.dtype)
        routed = torch.zeros_like(flat).index_add(0, token_of, weighted)
        out = routed.view(rows, seq, dim) + self.shared_experts(x)
        aux = self.balance_loss(routing, rows) if self.aux_loss_enabled else None
        return out, counts.detach().float(), aux

    def balance_loss(self, routing: RoutingResult, rows: int) -> torch.Tensor:
        """DeepSeek-V3's sequence-wise balance loss ``sum_i f_i P_i``, averaged over the ``rows`` of the batch.

        ``f_i = E / (k S) * #{tokens of the row choosing i}`` and ``P_i = mean_t s'_{i,t}`` with the scores
        normalized over all experts, ``s'_{i,t} = s_{i,t} / sum_j s_{j,t}``. Not yet multiplied by the coefficient.
        """
        num_experts = routing.scores.shape[-1]
        scores = routing.scores.view(rows, -1, num_experts)
        seq = scores.shape[1]
        probs = (scores / scores.sum(-1, keepdim=True)).mean(1)  # [B, E]
        chosen = torch.zeros_like(scores).scatter_(-1, routing.indices.view(rows, seq, -1), 1.0).sum(1)  # [B, E]
        fraction = chosen * num_experts / (self.top_k * seq)
        return (fraction * probs).sum(-1).mean()

    @torch.no_grad()
    def update_expert_bias(self, expert_load: torch.Tensor) -> None:
        """Aux-loss-free balancing step: ``expert_bias += rate * sign(mean_load - load)``.

        Under-loaded experts become more attractive to the top-k choice, over-loaded ones less.

        Args:
            expert_load: ``[E]`` tokens routed to each expert over the step (summed over data-parallel ranks).
        """
        load = expert_load.to(self.expert_bias.device, torch.float32)
        self.expert_bias.add_(self.bias_update_rate * torch.sign(load.mean() - load))
