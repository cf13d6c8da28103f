"""``python -m train recipe=<name> dry_run=true world_size=<N>``: the peak memory of every rank of a real-size
layout, per curriculum stage, without a GPU.

The real model is built on ``meta`` (no memory) under a fake process group of ``N`` ranks, the layout is validated
and its device mesh built exactly as in a run. Per pipeline stage (ranks of one pipeline stage hold the same
shapes) and per curriculum stage it reports the bytes one rank holds at the peak of a training step:

* parameters in ``precision.param_dtype``, frozen ones included; routed experts divided by ``ep``;
* gradients of the parameters the stage trains: in the parameter dtype plus the rank's reduce-dtype segments when
  micro-batches accumulate sharded (bf16 parameters, fp32 reduction, no pipeline: ``shards_micro_batches``), else
  in the wider of the parameter and reduce dtypes (a pipelined bf16 parameter accumulates in an fp32 ``main_grad``);
* fp32 master weights of the units a rank owns when the parameters are not fp32 (the largest rank's share);
* optimizer state, ZeRO-1 as optim/plan.py lays it out (Muon momentum, AdamW moments in
  ``precision.optimizer_state_dtype``, of the units a rank owns: the largest rank's share);
* the forward/backward peak above those: the maximum over the moments of the last micro-batch (the loss, each
  decoder block's backward, the vision tower's backward) of the activations still stored plus that moment's
  temporaries, plus the gradients present then (all of them after the first micro-batch; with one micro-batch,
  those of the parts whose backward has run). Stored bytes, forward and backward temporaries per token are
  *measured* on one real-width block in the parameter dtype under the stage's checkpointing policy
  (parallel/memory.py); the loss head
  (final norm, one chunk of logits, gradients of the hidden states and of the output projection) is measured on
  ``meta`` at the stage's exact shapes; context parallelism adds the gathered keys and values of the whole row
  (kept by ``none`` and ``selective``, rebuilt twice during a ``full`` block's recompute); under expert parallelism
  ``selective`` also keeps the two all-to-alls' outputs of every MoE layer; image patches per row
  follow the stage's mixture (the largest multimodal share of its replay part, each multimodal token an image
  token, ``merge^2`` patches each, images spread over the context ranks). With pipeline parallelism, stage ``s``
  holds the stored activations of ``pp - s`` micro-batches (1F1B);
* the optimizer step's buffers above parameters, gradients and state: the reduced gradient segments of every
  partition (in the reduce dtype, and their fp32 copy when that is narrower), plus the largest of: two
  reduce-scatter buckets (``optim.reduce_bucket_mb`` each, all ranks' slices together), the fp64 copy and
  square of a segment for the gradient norm, one owned matrix's Muon temporaries (Nesterov update, Newton-Schulz
  iterates in ``optim.muon_ns_dtype``, the fp32 result), an all-gather bucket and its output.

``peak`` is the larger of the two phases. It prints the table and one JSON line per stage (``dry_run {...}``). With
``device_memory_gb > 0`` the run fails if any rank's peak exceeds it, naming the stage, the rank and what to change.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from config import ConfigError, OptimConfig, PrecisionConfig, RunConfig, StageConfig
from config.model import ModelArgs
from model.vlm import KimiVL
from optim.build import route_parameters
from optim.distributed import shards_micro_batches
from optim.plan import Plan, Unit, build_units, build_units_all_adamw
from parallel.activation_checkpoint import default_policy
from parallel.dims import ParallelDims
from parallel.memory import (
    BlockBytes,
    decoder_layer_bytes_per_token,
    loss_head_peak_bytes,
    vision_block_bytes_per_patch,
)
from parallel.pipeline import layer_costs, split_layers
from train.loss import linear_cross_entropy_sum
from train.stages import apply_stage

GIB = 1024**3
FP32 = 4
_MEASURED: dict[str, dict[tuple[str, str], BlockBytes]] = {}


@dataclass
class RankMemory:
    stage: str
    pp_rank: int
    layers: range
    params: int
    grads: int
    optimizer: int
    masters: int
    grad_shards: int  # the reduce-dtype segments micro-batches accumulate into (sharded accumulation), else 0
    activations: int  # the forward/backward peak above parameters, optimizer state and the gradients of then
    grads_at_activation_peak: int
    step_buffers: int  # the optimizer step's temporaries above parameters, gradients and state
    cp_degree: int = 1
    policy: str = "none"
    image_patches: int = 0

    @property
    def peak(self) -> int:
        static = self.params + self.masters + self.optimizer + self.grad_shards
        return static + max(self.grads_at_activation_peak + self.activations, self.grads + self.step_buffers)

    def as_json(self) -> dict:
        return {"stage": self.stage, "pp_rank": self.pp_rank, "layers": [self.layers.start, self.layers.stop - 1],
                "params_gib": _gib(self.params), "grads_gib": _gib(self.grads),
                "grad_shards_gib": _gib(self.grad_shards), "masters_gib": _gib(self.masters),
                "optimizer_gib": _gib(self.optimizer),
                "activations_gib": _gib(self.activations), "step_buffers_gib": _gib(self.step_buffers),
                "peak_gib": _gib(self.peak), "cp_degree": self.cp_degree, "activation_checkpoint": self.policy,
                "image_patches_per_micro_batch": self.image_patches}


def _gib(value: int) -> float:
    return round(value / GIB, 3)


def _owned(name: str, layers: range, pp_rank: int, pp: int) -> bool:
    """Whether parameter ``name`` lives on pipeline stage ``pp_rank``."""
    if name.startswith("decoder.layers."):
        return int(name.split(".")[2]) in layers
    if name.startswith(("decoder.norm", "decoder.output")):
        return pp_rank == pp - 1
    return pp_rank == 0  # vision, projector, coca, token embeddings


def estimate(cfg: RunConfig, dims: ParallelDims, image_token_share: float | None = None) -> list[RankMemory]:
    """Per curriculum stage and pipeline stage, the bytes one rank holds at its peak (see the module docstring).

    Args:
        image_token_share: The share of a row's tokens that are image tokens, when known (a measured batch);
            None takes the bound the stage's mixture gives (:func:`image_patches`).
    """
    with torch.device("meta"):
        model = KimiVL(cfg.model)
    # The trainer's own split (parallel/pipeline.py's cost model), one stage per rank as in 1F1B.
    costs, first_extra, last_extra = layer_costs(cfg.model, max(s.seq_len for s in cfg.curriculum.stages.values()))
    splits = [range(stage[0], stage[-1] + 1) for stage in split_layers(costs, dims.pp_degree, first_extra,
                                                                        last_extra)]
    moe_names = {f"decoder.layers.{i}" for i, layer in model.decoder.layers.items() if layer.moe is not None}
    # Measured bytes per token, kept per process: the shapes of a flavor fix them (repeated dry runs reuse them).
    per_token = _MEASURED.setdefault(f"{cfg.model!r} {cfg.precision.param_dtype}", {})
    sizes = DtypeBytes.of(cfg.precision)
    sharded = shards_micro_batches(*(getattr(torch, d) for d in (cfg.precision.param_dtype,
                                                                 cfg.precision.reduce_dtype)), dims.pp_degree > 1)
    reports = []
    for name in cfg.curriculum.order:
        stage = cfg.curriculum.stages[name]
        apply_stage(model, stage)
        policy = stage.activation_checkpoint or cfg.parallel.activation_checkpoint
        policy = default_policy(stage.seq_len) if policy == "auto" else policy
        stage_dims = dims.for_stage(stage.cp_degree, stage.seq_len)
        routes = {r.name: r for r in route_parameters(model)}
        units = build_units(model) if cfg.optim.name == "muon" else build_units_all_adamw(model)
        for pp_rank, layers in enumerate(splits):
            here = [u for u in units if _owned(u.route.name, layers, pp_rank, dims.pp_degree)]
            step = optimizer_step_bytes(here, stage_dims, cfg.optim, cfg.precision)
            params = 0
            grads: dict[str, int] = {}
            for pname, param in model.named_parameters():
                if not _owned(pname, layers, pp_rank, dims.pp_degree):
                    continue
                is_expert = ".moe.experts." in pname
                numel = param.numel() // (dims.ep_degree if is_expert else 1)
                params += numel * sizes.param
                route = routes.get(pname)
                if route is None:  # frozen in this stage
                    continue
                grads[pname] = numel * (sizes.param if sharded else sizes.grad)
            phase = ActivationPeak(cfg, stage, stage_dims, pp_rank, layers, moe_names, policy, grads, per_token,
                                   image_token_share)
            shards = step.owned * sizes.reduce if sharded else 0
            reports.append(RankMemory(name, pp_rank, layers, params, sum(grads.values()), step.state, step.masters,
                                      shards, phase.bytes, phase.grads, step.buffers, stage_dims.cp_degree, policy,
                                      phase.patches))
    return reports


@dataclass(frozen=True)
class DtypeBytes:
    """Bytes per element of what a training step holds, by ``precision``."""

    param: int
    reduce: int
    grad: int  # the accumulation buffer: the wider of the parameter and reduce dtypes
    state: int
    master: int  # 4 when the parameters are not fp32, else 0 (they are their own master)

    @classmethod
    def of(cls, precision: PrecisionConfig) -> DtypeBytes:
        param, reduce = (getattr(torch, d).itemsize for d in (precision.param_dtype, precision.reduce_dtype))
        return cls(param=param, reduce=reduce, grad=max(param, reduce),
                   state=getattr(torch, precision.optimizer_state_dtype).itemsize, master=0 if param == 4 else 4)


@dataclass
class StepBytes:
    state: int  # optimizer state of the most loaded rank
    masters: int  # fp32 master weights of the most loaded rank
    owned: int  # elements the most loaded rank homes
    buffers: int  # the step's temporaries on the most loaded rank


def optimizer_step_bytes(units: list[Unit], dims: ParallelDims, optim: OptimConfig,
                         precision: PrecisionConfig | None = None) -> StepBytes:
    """The ZeRO-1 step's state and temporaries on the most loaded rank, from the optimizer's own plan
    (optim/plan.py: ``units`` of one pipeline stage from ``build_units`` on the meta model, dense units over the
    data x context ranks, this expert-parallel shard's expert units over the expert-data ranks)."""
    local_experts = {u.route.name: u.route.shape[0] // dims.ep_degree for u in units if u.route.per_expert}
    dense = [u for u in units if not u.route.per_expert]
    experts = [u for u in units if u.route.per_expert and (u.expert is None or u.expert < local_experts[u.route.name])]
    sizes = DtypeBytes.of(precision or PrecisionConfig())
    bucket = max(1, int(optim.reduce_bucket_mb * 2**20) // FP32)
    ns_bytes = 2 if optim.muon_ns_dtype == "bfloat16" else 4
    segments, phases, held = [], [], []
    for part, world in ((dense, dims.dp_degree * dims.cp_degree), (experts, dims.expert_data_degree)):
        if not part:
            continue
        plan = Plan(part, world, ns_bytes=ns_bytes)
        segment = plan.segment
        width = min(max(1, bucket // world), segment)
        buckets = math.ceil(segment / width)
        # the reduced segment, and its fp32 copy when reduced in a narrower dtype
        segments.append(segment * (sizes.reduce + (FP32 if sizes.reduce < FP32 else 0)))
        held.append(list(zip(plan.state_bytes(sizes.state), plan.owned_numel(), strict=True)))
        computed = [u for u, tasks in plan.tasks.items() if tasks]
        largest = max(computed, key=lambda u: u.numel, default=None)
        muon = 0
        if largest is not None:
            rows, cols = largest.matrix_shape
            small = min(rows, cols)
            # the Nesterov update (fp32), three Newton-Schulz iterates and two Gram-sized products, the fp32 result
            # (a rank computing a block of rows still holds the whole iterate), plus what the compute-layout
            # all-to-alls bring in
            received = [0] * world
            for piece, _, destination in plan.update_moves():
                received[destination] += piece.numel * ns_bytes
            muon = largest.numel * (2 * FP32 + 3 * ns_bytes) + 2 * small * small * ns_bytes + max(received)
        phases += [
            sum(segments[:-1]) + min(2, buckets) * world * width * sizes.reduce,  # reduce-scatter: two in flight
            16 * segment,  # the gradient norm: an fp64 copy of the segment and its square
            muon,
            (world + 1) * width * sizes.param if world > 1 else 0,  # all-gather: this rank's bucket and everyone's
        ]
    # Dense rank r homes its dense share and, as rank r // ep of its expert-data group, an expert share.
    ranks = len(held[0]) if held else 1
    per_rank = [tuple(sum(part[r * len(part) // ranks][i] for part in held) for i in range(2)) for r in range(ranks)]
    # Each figure of its most loaded rank (a bound when those are different ranks).
    state, owned = (max((held[i] for held in per_rank), default=0) for i in range(2))
    return StepBytes(state, owned * sizes.master, owned, sum(segments) + max(phases, default=0))


class ActivationPeak:
    """The forward/backward peak of the last micro-batch on one rank, above parameters and optimizer state: the
    largest of the moments listed in the module docstring. ``bytes`` excludes gradients, ``grads`` are those
    present at that moment."""

    def __init__(self, cfg: RunConfig, stage: StageConfig, dims: ParallelDims, pp_rank: int, layers: range,
                 moe_names: set[str], policy: str, grads: dict[str, int], per_token: dict,
                 image_token_share: float | None = None):
        args = cfg.model
        dtype = getattr(torch, cfg.precision.param_dtype)
        self.patches = 0
        self.bytes = self.grads = 0
        # Gradients outlive a micro-batch unless each one is reduce-scattered away before the next (sharded).
        sharded = shards_micro_batches(dtype, getattr(torch, cfg.precision.reduce_dtype), dims.pp_degree > 1)
        accumulating = (stage.grad_accum_steps > 1 or dims.pp_degree > 1) and not sharded
        grads_before = sum(grads.values()) if accumulating else 0

        def measured(kind: str) -> BlockBytes:
            if (kind, policy) not in per_token:
                if kind == "vision":
                    per_token[kind, policy] = vision_block_bytes_per_patch(args.vision, policy, dtype=dtype)
                else:
                    per_token[kind, policy] = decoder_layer_bytes_per_token(args.decoder, kind == "moe", policy,
                                                                            dtype=dtype)
            return per_token[kind, policy]

        def moment(stored: float, extra: float, grads_now: int) -> None:
            if stored + extra + grads_now > self.bytes + self.grads:
                self.bytes, self.grads = int(stored + extra), grads_now

        in_flight = dims.pp_degree - pp_rank  # 1F1B: stage s holds at most pp - s micro-batches' activations
        if stage.objective == "coca":
            self.patches = stage.micro_batch_size * stage.max_image_patches
            vision = measured("vision")
            if pp_rank == 0:
                stored = self.patches * vision.stored * args.vision.num_layers * in_flight
                moment(stored, self.patches * vision.backward_extra, sum(grads.values()))
            return
        tokens = stage.micro_batch_size * stage.seq_len // dims.cp_degree
        hidden_bytes = tokens * args.decoder.hidden_size * dtype.itemsize
        if pp_rank == 0:
            self.patches = int(image_patches(stage, args, image_token_share) / dims.cp_degree)
        kinds = ["moe" if f"decoder.layers.{i}" in moe_names else "dense" for i in layers]
        blocks = [measured(kind) for kind in kinds]
        kv = context_parallel_kv_bytes(args, stage, dims, dtype.itemsize)
        kept_kv = kv if policy != "full" else 0
        vision = measured("vision") if self.patches else BlockBytes(0.0, 0.0, 0.0)
        vision_stored = self.patches * vision.stored * args.vision.num_layers
        # Stored before the decoder: the embeddings (block 0's input) and the vision tower's activations.
        base = (hidden_bytes + vision_stored) if pp_rank == 0 else hidden_bytes
        # Under expert parallelism the selective policy also keeps both all-to-alls' outputs (collectives are never
        # re-issued in a recompute): the dispatched and the combined rows, k per token, that one block's
        # single-process measurement does not have.
        decoder = args.decoder
        kept_exchange = (2 * decoder.num_experts_per_token * decoder.hidden_size * dtype.itemsize
                         if dims.ep_degree > 1 and policy == "selective" else 0)
        stored = [tokens * (b.stored + (kept_exchange if kind == "moe" else 0)) + kept_kv
                  for b, kind in zip(blocks, kinds, strict=True)]
        earlier = (in_flight - 1) * (base + sum(stored))  # micro-batches whose backward has not started (1F1B)
        # Forward of each block, then the loss head on the last stage.
        for i, block in enumerate(blocks):
            moment(earlier + base + sum(stored[:i]), tokens * block.forward_extra + 2 * kv, grads_before)
        layer_grads = [sum(v for k, v in grads.items() if k.startswith(f"decoder.layers.{i}.")) for i in layers]
        head = sum(v for k, v in grads.items() if k.startswith(("decoder.norm", "decoder.output")))
        done = 0 if accumulating else head
        if pp_rank == dims.pp_degree - 1:
            loss = loss_head_peak_bytes(args.decoder, tokens, functools.partial(
                linear_cross_entropy_sum, chunk_tokens=cfg.loss_chunk_tokens), accumulating, dtype)
            moment(earlier + base + sum(stored), loss, grads_before)
        # Backward of each block, last first: its own stored bytes and those below it still alive.
        for i in reversed(range(len(blocks))):
            if not accumulating:
                done += layer_grads[i]
            extra = tokens * blocks[i].backward_extra + (2 * kv if policy == "full" else 0)
            moment(earlier + base + sum(stored[: i + 1]), extra, max(grads_before, done))
        if pp_rank == 0 and self.patches:
            # The vision tower's backward, after the decoder's: every decoder gradient exists by then.
            moment(earlier + vision_stored + hidden_bytes, self.patches * vision.backward_extra,
                   sum(grads.values()))


def image_patches(stage: StageConfig, args: ModelArgs, image_token_share: float | None = None) -> float:
    """Image patches of one micro-batch: ``image_token_share`` of its tokens, or by default the stage's largest
    multimodal share of its replay draws with each multimodal token taken as an image token (a bound: captions
    and interleaved text make it smaller), merged from ``merge^2`` patches each."""
    mix = stage.mixture
    share = image_token_share
    if share is None:
        share = (1.0 - mix.long_share) * max(mix.multimodal_share_start, mix.multimodal_share_end)
    return stage.micro_batch_size * stage.seq_len * share * args.vision.merge_size**2


def context_parallel_kv_bytes(args: ModelArgs, stage: StageConfig, dims: ParallelDims, element_bytes: int = FP32
                              ) -> int:
    """Bytes of one decoder layer's gathered keys and values of a whole micro-batch (parallel/context.py: keys and
    values padded to the query head dim, side by side, in global order); 0 without context parallelism."""
    if dims.cp_degree == 1:
        return 0
    decoder = args.decoder
    head_dim = decoder.qk_nope_head_dim + decoder.qk_rope_head_dim
    return stage.micro_batch_size * stage.seq_len * decoder.num_heads * 2 * head_dim * element_bytes


def predict(cfg: RunConfig, image_token_share: float | None = None) -> list[RankMemory]:
    """The per-rank peaks of ``cfg`` at ``cfg.world_size`` ranks (no process group needed); see :func:`estimate`."""
    seq_lens = [cfg.curriculum.stages[n].seq_len for n in cfg.curriculum.order]
    dims = ParallelDims.from_config(cfg.parallel, cfg.world_size, cfg.model, seq_lens)
    return estimate(cfg, dims, image_token_share)


def run_dry_run(cfg: RunConfig) -> int:
    """Validate the layout at ``cfg.world_size`` ranks under a fake process group and print the memory table."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    world = cfg.world_size
    seq_lens = [cfg.curriculum.stages[n].seq_len for n in cfg.curriculum.order]
    dims = ParallelDims.from_config(cfg.parallel, world, cfg.model, seq_lens)
    dist.init_process_group(backend="fake", rank=0, world_size=world, store=FakeStore())
    try:
        mesh = dims.build_mesh()
        reports = estimate(cfg, dims)
    finally:
        dist.destroy_process_group()
    print(f"dry run: {cfg.model.flavor} on {world} ranks, mesh {dict(zip(mesh.mesh_dim_names, mesh.shape))}, "
          f"ep={dims.ep_degree} (expert-data {dims.expert_data_degree}), parameters {cfg.precision.param_dtype}, "
          f"reduce {cfg.precision.reduce_dtype}, optimizer state {cfg.precision.optimizer_state_dtype}, activation "
          "checkpointing "
          f"'{cfg.parallel.activation_checkpoint}'")
    print(f"{'stage':<16}{'pp':>3} {'layers':>9} {'params GiB':>11} {'grads GiB':>10} {'master GiB':>11} "
          f"{'optim GiB':>10} {'activ GiB':>10} {'step GiB':>9} {'peak GiB':>9}  cp  checkpointing")
    for r in reports:
        print(f"{r.stage:<16}{r.pp_rank:>3} {r.layers.start:>4}-{r.layers.stop - 1:<4} {r.params / GIB:>11.2f} "
              f"{(r.grads + r.grad_shards) / GIB:>10.2f} {r.masters / GIB:>11.2f} {r.optimizer / GIB:>10.2f} "
              f"{r.activations / GIB:>10.2f} "
              f"{r.step_buffers / GIB:>9.2f} {r.peak / GIB:>9.2f} {r.cp_degree:>3}  {r.policy}")
    for r in reports:
        print("dry_run " + json.dumps(r.as_json()))
    limit = cfg.device_memory_gb * GIB
    over = [r for r in reports if limit and r.peak > limit]
    if over:
        worst = max(over, key=lambda r: r.peak)
        raise ConfigError(f"stage '{worst.stage}' needs {worst.peak / GIB:.1f} GiB on pipeline rank "
                          f"{worst.pp_rank}, over device_memory_gb={cfg.device_memory_gb}: raise parallel.pp_degree, "
                          "ep_degree or cp_degree, use parallel.activation_checkpoint=full, or lower the stage's "
                          "micro_batch_size.")
    return 0
