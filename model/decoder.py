"""The DeepSeek-V3 / Moonlight-style decoder: multi-head latent attention (MLA) and a mixture of experts.

Tokens arrive as ``[B, S]`` rows of packed documents; attention runs over the flattened ``B * S`` tokens with
``cu_seqlens`` (documents never cross rows), and RoPE uses ``position_ids``, which restart at 0 in every document.
So a packed row computes exactly what its documents would compute alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from config.model import DecoderArgs
from model.attention import DocumentAttention, apply_rotary, rope_angles_1d
from model.init import ParamInit
from model.layers import RMSNorm, SwiGLU, init_default_weights
from model.moe import MoE

__all__ = ["MLA", "DecoderLayer", "MoEAux", "MoEDecoder", "Rope"]

# DeepSeek-V3 normalizes the KV latent with RMSNorm's default epsilon, not the model's rms_norm_eps (same in the
# reference code and in transformers); kept so weights and logits match the released models.
LATENT_NORM_EPS = 1e-6


@dataclass
class MoEAux:
    """Side outputs of the MoE layers of one forward.

    Attributes:
        expert_load: ``[num_moe_layers, E]`` detached fp32 token counts per routed expert (for bias balancing and
            metrics).
        aux_loss: Scalar sum over the MoE layers of the *unweighted* sequence-level balance loss; the trainer
            multiplies it by ``aux_loss_coef``. A zero tensor when ``aux_loss_coef == 0``.
    """

    expert_load: torch.Tensor
    aux_loss: torch.Tensor


class MLA(nn.Module):
    """Multi-head latent attention without query LoRA (Moonlight / DeepSeek-V2-Lite layout).

    Keys and values are decompressed from a ``kv_lora_rank`` latent; the rotary part of the key
    (``qk_rope_head_dim``) comes straight from the hidden state and is shared by all heads.

    Args:
        args: Decoder hyper-parameters.
    """

    def __init__(self, args: DecoderArgs):
        super().__init__()
        self.nope_dim = args.qk_nope_head_dim
        self.rope_dim = args.qk_rope_head_dim
        self.v_dim = args.v_head_dim
        self.kv_lora_rank = args.kv_lora_rank
        self.q_proj = nn.Linear(args.hidden_size, args.num_heads * (self.nope_dim + self.rope_dim), bias=False)
        self.kv_a_proj = nn.Linear(args.hidden_size, args.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_norm = RMSNorm(args.kv_lora_rank, eps=LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(args.kv_lora_rank, args.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(args.num_heads * self.v_dim, args.hidden_size, bias=False)
        self.core = DocumentAttention(causal=True)

    def forward(self, x: torch.Tensor, angles: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """Causal attention within documents.

        Args:
            x: ``[B, S, hidden]`` normalized hidden states.
            angles: ``[B * S, rope_dim / 2]`` RoPE angles of the flattened tokens.
            cu_seqlens: ``int32 [docs + 1]`` document boundaries over the flattened tokens.

        Returns:
            ``[B, S, hidden]``.
        """
        rows, seq, _ = x.shape
        tokens = rows * seq
        q = self.q_proj(x).view(tokens, -1, self.nope_dim + self.rope_dim)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj(x).view(tokens, -1).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_norm(latent)).view(tokens, -1, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        heads = q.shape[1]
        # One rotary key per token, broadcast to every head (the "MQA" part of MLA).
        k_rope = apply_rotary(k_rope.unsqueeze(1), angles).expand(tokens, heads, self.rope_dim)
        q = torch.cat((q_nope, apply_rotary(q_rope, angles)), dim=-1)
        k = torch.cat((k_nope, k_rope), dim=-1)
        scale = (self.nope_dim + self.rope_dim) ** -0.5
        out = self.core(q, k, v, cu_seqlens, scale=scale)
        return self.o_proj(out.reshape(rows, seq, -1))


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + MLA(norm(x))`` then ``x + FFN(norm(x))``, the FFN dense (``mlp``) or MoE (``moe``).

    Args:
        args: Decoder hyper-parameters.
        use_moe: Whether the FFN is the mixture of experts.
    """

    def __init__(self, args: DecoderArgs, use_moe: bool):
        super().__init__()
        self.attention_norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.attention = MLA(args)
        self.ffn_norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.mlp = None if use_moe else SwiGLU(args.hidden_size, args.dense_ffn_size)
        self.moe = MoE(args.hidden_size, args) if use_moe else None

    def forward(
        self, x: torch.Tensor, angles: torch.Tensor, cu_seqlens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Apply the layer.

        Args:
            x: ``[B, S, hidden]``.
            angles: ``[B * S, rope_dim / 2]`` RoPE angles.
            cu_seqlens: ``int32 [docs + 1]`` document boundaries over the flattened tokens.

        Returns:
            ``(x, expert_load or None, aux_loss or None)``: the MoE outputs are None for a dense layer.
        """
        x = x + self.attention(self.attention_norm(x), angles, cu_seqlens)
        if self.moe is None:
            return x + self.mlp(self.ffn_norm(x)), None, None
        out, load, aux = self.moe(self.ffn_norm(x))
        return x + out, load, aux


class Rope(nn.Module):
    """RoPE angles of token positions, with a base that curriculum stages change (long context) without touching the
    state dict (no parameters or buffers).

    A module rather than a plain attribute of the decoder: every module that holds it (a pipeline stage's view of
    the decoder too) reads the base set last.

    Args:
        dim: Rotated dims per head.
        theta: RoPE base.
    """

    def __init__(self, dim: int, theta: float):
        super().__init__()
        self.dim = dim
        self.theta = theta

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """``[B * S, dim / 2]`` fp32 angles of the flattened ``position_ids``."""
        return rope_angles_1d(position_ids.reshape(-1), self.dim, self.theta)


def default_cu_seqlens(rows: int, seq: int) -> torch.Tensor:
    """``cu_seqlens`` of one document per row, on the host like every batch's document boundaries (attention reads
    them there; the flash kernel copies them to the device)."""
    return torch.arange(0, (rows + 1) * seq, seq, device="cpu", dtype=torch.int32)


class MoEDecoder(nn.Module):
    """Embedding, ``num_layers`` decoder layers (the first ``num_dense_layers`` dense), final RMSNorm, output head.

    The forward runs the parts the decoder holds, so it also runs one pipeline stage of a pruned decoder (as
    torchtitan's model chunks): without ``embed_tokens`` its input is the previous stage's hidden states, it runs the
    layers left in ``layers``, and without ``norm`` it returns the hidden states of its last layer.

    Args:
        args: Decoder hyper-parameters.
    """

    def __init__(self, args: DecoderArgs):
        super().__init__()
        if not 0 <= args.num_dense_layers <= args.num_layers:
            raise ValueError(f"num_dense_layers={args.num_dense_layers} must be between 0 and num_layers="
                             f"{args.num_layers}.")
        self.init_std = args.init_std
        self.rope = Rope(args.qk_rope_head_dim, args.rope_theta)
        self.num_experts = args.num_routed_experts
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        # A dict keyed by layer index keeps names stable when pipeline parallelism drops layers of other stages.
        self.layers = nn.ModuleDict(
            {str(i): DecoderLayer(args, use_moe=i >= args.num_dense_layers) for i in range(args.num_layers)}
        )
        self.norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.output = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def set_rope_theta(self, theta: float) -> None:
        """Change the RoPE base used by the next forwards (e.g. 50,000 -> 800,000 for long context)."""
        if theta <= 0:
            raise ValueError(f"rope_theta must be > 0, got {theta}.")
        self.rope.theta = float(theta)

    def init_weights(self, init: ParamInit | None = None) -> None:
        """Initialize every parameter and buffer this decoder holds (weights ``normal(0, init_std)``).

        Args:
            init: The initializer named at this decoder (None: seeded from torch's global generator).
        """
        init = init or ParamInit.from_global_rng()
        for name, child in self.named_children():
            if name != "layers":
                init_default_weights(child, self.init_std, init.child(name))
        for key, layer in self.layers.items():
            for name, child in layer.named_children():
                child_init = init.child(f"layers.{key}.{name}")
                if isinstance(child, MoE):  # stacked experts and the balancing bias need their own rule
                    child.init_weights(self.init_std, child_init)
                else:
                    init_default_weights(child, self.init_std, child_init)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MoEAux]:
        """Run the decoder over packed rows: embedding, the layers it holds, final norm (the parts it holds).

        Args:
            input_ids: ``int64 [B, S]`` token ids (exactly one of ``input_ids`` / ``inputs_embeds``; only on a
                decoder holding ``embed_tokens``).
            position_ids: ``int64 [B, S]`` position of each token inside its document; ``0..S-1`` per row if None.
            cu_seqlens: ``int32 [docs + 1]`` document boundaries over the flattened ``B * S`` tokens; one document
                per row if None.
            inputs_embeds: ``[B, S, hidden]`` used instead of ``input_ids``: embeddings with images scattered in, or
                a previous pipeline stage's hidden states.

        Returns:
            ``(hidden [B, S, hidden], MoEAux of the layers held)``: ``hidden`` after the final norm, or after the
            last layer held on a decoder without ``norm`` (a pipeline stage before the last).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None and self.embed_tokens is None:
            raise ValueError("this decoder holds no token embedding (a pipeline stage after the first): pass the "
                             "previous stage's hidden states as inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        rows, seq, _ = x.shape
        if position_ids is None:
            position_ids = torch.arange(seq, device=x.device).expand(rows, seq)
        if cu_seqlens is None:
            cu_seqlens = default_cu_seqlens(rows, seq)
        angles = self.rope(position_ids)
        loads, aux_losses = [], []
        for layer in self.layers.values():
            x, load, aux = layer(x, angles, cu_seqlens)
            if load is not None:
                loads.append(load)
            if aux is not None:
                aux_losses.append(aux)
        expert_load = torch.stack(loads) if loads else x.new_zeros(0, self.num_experts, dtype=torch.float32)
        aux_loss = torch.stack(aux_losses).sum() if aux_losses else x.new_zeros((), dtype=torch.float32)
        hidden = self.norm(x) if self.norm is not None else x
        return hidden, MoEAux(expert_load=expert_load, aux_loss=aux_loss)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project final hidden states to vocabulary logits."""
        return self.output(hidden)

    def update_expert_bias(self, expert_load: torch.Tensor) -> None:
        """Aux-loss-free balancing of every MoE layer.

        Args:
            expert_load: ``[num_moe_layers, E]`` token counts of the step (summed over data-parallel ranks), in the
                order of the MoE layers.
        """
        moe_layers = [layer.moe for layer in self.layers.values() if layer.moe is not None]
        if expert_load.shape[0] != len(moe_layers):
            raise ValueError(f"expert_load has {expert_load.shape[0]} rows but the decoder has {len(moe_layers)} "
                             "MoE layers.")
        for moe, load in zip(moe_layers, expert_load, strict=True):
            moe.update_expert_bias(load)
