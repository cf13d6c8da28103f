"""The MoE decoder: packing invariance, MoE against a per-token reference, bias balancing, RoPE base changes,
pruned pipeline parts, and parity with transformers' DeepseekV3ForCausalLM."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from config.model import DecoderArgs
from model.decoder import MoEDecoder
from model.moe import MoE

ARGS = DecoderArgs(vocab_size=97, hidden_size=32, num_layers=3, num_dense_layers=1, dense_ffn_size=48, num_heads=4,
                   kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, num_routed_experts=8,
                   num_shared_experts=2, num_experts_per_token=3, moe_ffn_size=12, rope_theta=100.0, init_std=0.1)


def _build_decoder(args: DecoderArgs = ARGS) -> MoEDecoder:
    torch.manual_seed(0)
    with torch.device("meta"):
        decoder = MoEDecoder(args)
    decoder.to_empty(device="cpu")
    decoder.init_weights()
    return decoder


def test_decoder_packed_rows_equal_documents_alone():
    decoder = _build_decoder()
    seq = 12
    docs = [torch.randint(0, 97, (n,)) for n in (5, 7, 12)]  # row 0: docs 0 and 1, row 1: doc 2
    input_ids = torch.cat(docs).view(2, seq)
    position_ids = torch.cat([torch.arange(len(d)) for d in docs]).view(2, seq)
    cu_seqlens = torch.tensor([0, 5, 12, 24], dtype=torch.int32)
    hidden, aux = decoder(input_ids, position_ids, cu_seqlens)
    alone = torch.cat([decoder(d[None])[0][0] for d in docs])
    torch.testing.assert_close(hidden.view(-1, 32), alone, atol=1e-5, rtol=0)
    assert aux.expert_load.shape == (2, 8)
    assert aux.expert_load.sum(1).tolist() == [24 * 3, 24 * 3]  # every token routed to k experts in each layer
    assert aux.aux_loss.shape == () and float(aux.aux_loss) == 0.0  # disabled by default
    assert decoder.logits(hidden).shape == (2, seq, 97)


def test_set_rope_theta_changes_outputs_not_state():
    decoder = _build_decoder()
    ids = torch.randint(0, 97, (1, 10))
    before_state = {k: v.clone() for k, v in decoder.state_dict().items()}
    before = decoder(ids)[0]
    decoder.set_rope_theta(800000.0)
    after = decoder(ids)[0]
    assert not torch.allclose(before, after, atol=1e-4)
    state = decoder.state_dict()
    assert state.keys() == before_state.keys()
    assert all(torch.equal(state[k], before_state[k]) for k in state)


def _naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: top-k of biased sigmoid scores, unbiased normalized weights, SwiGLU experts, + shared."""
    experts = moe.experts
    out = []
    for h in x:
        scores = torch.sigmoid(moe.router.weight @ h)
        chosen = torch.topk(scores + moe.expert_bias, moe.top_k).indices
        weights = scores[chosen] / scores[chosen].sum() * moe.routed_scaling_factor
        y = moe.shared_experts(h)
        for e, w in zip(chosen.tolist(), weights, strict=True):
            y = y + w * (experts.w_down[e] @ (F.silu(experts.w_gate[e] @ h) * (experts.w_up[e] @ h)))
        out.append(y)
    return torch.stack(out)


def test_moe_equals_per_token_reference():
    torch.manual_seed(0)
    args = DecoderArgs(**{**ARGS.__dict__, "aux_loss_coef": 0.01})
    moe = MoE(32, args)
    moe.init_weights(0.1)
    moe.expert_bias.copy_(torch.randn(8) * 0.05)  # steers the choice, must not enter the weights
    x = torch.randn(2, 9, 32)
    out, load, aux = moe(x)
    torch.testing.assert_close(out.view(-1, 32), _naive_moe(moe, x.view(-1, 32)), atol=1e-5, rtol=0)
    chosen = torch.topk(torch.sigmoid(x.view(-1, 32) @ moe.router.weight.t()) + moe.expert_bias, 3).indices
    assert torch.equal(load, torch.bincount(chosen.view(-1), minlength=8).float())
    assert not load.requires_grad
    # DeepSeek-V3 sequence-wise balance loss, per row then averaged.
    scores = torch.sigmoid(x @ moe.router.weight.t())
    probs = (scores / scores.sum(-1, keepdim=True)).mean(1)
    counts = torch.stack([torch.bincount(c.view(-1), minlength=8) for c in chosen.view(2, 9, 3)]).float()
    expected = (counts * 8 / (3 * 9) * probs).sum(-1).mean()
    torch.testing.assert_close(aux, expected)
    out.sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0 and moe.experts.w_down.grad.abs().sum() > 0


def test_update_expert_bias_moves_towards_underloaded_experts():
    decoder = _build_decoder()
    load = torch.tensor([[10.0, 0.0, 5.0, 5.0, 1.0, 9.0, 5.0, 5.0], [5.0] * 8])
    decoder.update_expert_bias(load)
    rate = ARGS.bias_update_rate
    biases = [layer.moe.expert_bias for layer in decoder.layers.values() if layer.moe is not None]
    torch.testing.assert_close(biases[0], rate * torch.tensor([-1.0, 1.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0]))
    torch.testing.assert_close(biases[1], torch.zeros(8))
    assert biases[0].dtype == torch.float32 and "layers.1.moe.expert_bias" in decoder.state_dict()
    assert all(not name.endswith("expert_bias") for name, _ in decoder.named_parameters())


def test_bias_balancing_evens_out_a_skewed_router():
    torch.manual_seed(0)
    moe = MoE(32, DecoderArgs(**{**ARGS.__dict__, "bias_update_rate": 0.01}))
    moe.init_weights(0.1)
    with torch.no_grad():
        moe.router.weight[0] += 0.5  # expert 0 is everyone's favourite
    x = torch.randn(1, 256, 32) + 1.0
    first = moe(x)[1]
    for _ in range(100):
        moe.update_expert_bias(moe(x)[1])
    last = moe(x)[1]
    assert last.max() < first.max() and last.std() < first.std()


def test_parity_with_transformers_deepseek_v3():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    args = DecoderArgs(**{**ARGS.__dict__, "rms_norm_eps": 1e-5, "rope_theta": 500.0})
    config = DeepseekV3Config(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=args.dense_ffn_size,
        moe_intermediate_size=args.moe_ffn_size, num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads, num_key_value_heads=args.num_heads,
        n_shared_experts=args.num_shared_experts, n_routed_experts=args.num_routed_experts,
        routed_scaling_factor=args.routed_scaling_factor, kv_lora_rank=args.kv_lora_rank, q_lora_rank=None,
        qk_rope_head_dim=args.qk_rope_head_dim, v_head_dim=args.v_head_dim, qk_nope_head_dim=args.qk_nope_head_dim,
        n_group=1, topk_group=1, num_experts_per_tok=args.num_experts_per_token,
        first_k_dense_replace=args.num_dense_layers, norm_topk_prob=True, rms_norm_eps=args.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta}, rope_interleave=True,
        tie_word_embeddings=False, initializer_range=0.1, attn_implementation="eager")
    torch.manual_seed(0)
    reference = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms and balancing biases, so a wrong mapping cannot hide
        for name, tensor in reference.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                tensor.add_(torch.randn_like(tensor) * 0.1)
        for name, buffer in reference.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer) * 0.02)
    ours = _build_decoder(args)
    ours.load_state_dict(_to_our_names(reference.state_dict(), args))
    input_ids = torch.randint(0, args.vocab_size, (2, 11))
    with torch.no_grad():
        want = reference(input_ids).logits
        got = ours.logits(ours(input_ids)[0])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def _to_our_names(hf: dict[str, torch.Tensor], args: DecoderArgs) -> dict[str, torch.Tensor]:
    renames = {"self_attn.kv_a_proj_with_mqa": "attention.kv_a_proj", "self_attn.kv_a_layernorm": "attention.kv_a_norm",
               "self_attn.": "attention.", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
               "mlp.gate.e_score_correction_bias": "moe.expert_bias", "mlp.gate.weight": "moe.router.weight",
               "mlp.shared_experts.": "moe.shared_experts."}
    out = {"embed_tokens.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
           "output.weight": hf["lm_head.weight"]}
    for name, tensor in hf.items():
        if not name.startswith("model.layers."):
            continue
        name = name.removeprefix("model.")
        if name.endswith("mlp.experts.gate_up_proj"):
            gate, up = tensor.chunk(2, dim=1)  # [E, 2 * ffn, hidden]: gate rows first
            prefix = name.removesuffix("mlp.experts.gate_up_proj")
            out[prefix + "moe.experts.w_gate"], out[prefix + "moe.experts.w_up"] = gate, up
            continue
        if name.endswith("mlp.experts.down_proj"):
            out[name.replace("mlp.experts.down_proj", "moe.experts.w_down")] = tensor
            continue
        for old, new in renames.items():
            if old in name:
                name = name.replace(old, new)
                break
        out[name] = tensor
    return out


def test_pruned_decoders_run_their_parts_of_the_forward():
    """Two pipeline stages as pruned copies (torchtitan's model chunks): the first holds the embedding and layer 0,
    the second the rest and the final norm; chained, they compute the whole decoder bit for bit."""
    decoder = _build_decoder()
    ids = torch.randint(0, 97, (2, 10))
    hidden, aux = decoder(ids)
    first, last = copy.deepcopy(decoder), copy.deepcopy(decoder)
    first.norm = first.output = last.embed_tokens = None
    del first.layers["1"], first.layers["2"], last.layers["0"]
    middle, aux_first = first(ids)
    with pytest.raises(ValueError, match="inputs_embeds"):
        last(ids)
    out, aux_last = last(inputs_embeds=middle)
    assert torch.equal(out, hidden)
    assert aux_first.expert_load.shape == (0, 8)  # layer 0 is dense
    assert torch.equal(aux_last.expert_load, aux.expert_load)
