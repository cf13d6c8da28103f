"""``python -m train recipe=<name> dry_run=true world_size=<N>``: the memory of every rank of a real-size layout,
per curriculum stage, without a GPU.

The real model is built on ``meta`` (no memory) under a fake process group of ``N`` ranks, the layout is validated
and its device mesh built exactly as in a run. Per pipeline stage (ranks of one pipeline stage hold the same
shapes) and per curriculum stage it reports bytes of:

* parameters (fp32, as the trainer keeps them): the stage's decoder layers, the vision tower, projector, CoCa towers
  and embeddings on the first stage, the output head on the last; routed experts divided by ``ep``;
* gradients of the parameters the curriculum stage trains;
* optimizer state, ZeRO-1: Muon momentum (4 B per element) and AdamW moments (8 B), dense state divided over the
  data x context ranks, expert state over the expert-data ranks;
* activations: bytes per token *measured* on one real-width block under the stage's checkpointing policy
  (parallel/memory.py), times the tokens of a micro-batch on this rank (``micro_batch_size x seq_len / cp``), the
  stage's layers and the micro-batches in flight under 1F1B (``pp - stage index``), plus the logits on the last
  stage and the vision tower's patches on the first.

With ``device_memory_gb > 0`` the run fails if any rank exceeds it, naming the stage, the rank and what to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model.args import ModelArgs
from model.vlm import KimiVL
from optim.build import MUON, route_parameters
from parallel.activation_checkpoint import default_policy
from parallel.dims import ParallelDims
from parallel.memory import decoder_layer_activation_bytes_per_token, vision_block_activation_bytes_per_token
from parallel.pipeline import layer_costs, split_layers
from train.config import ConfigError, RunConfig, StageConfig
from train.stages import apply_stage

GIB = 1024**3
FP32 = 4
_MEASURED: dict[str, dict[tuple[str, str], float]] = {}


@dataclass
class RankMemory:
    stage: str
    pp_rank: int
    layers: range
    params: int
    grads: int
    optimizer: int
    activations: int
    cp_degree: int = 1
    policy: str = "none"

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations


def _owned(name: str, layers: range, pp_rank: int, pp: int) -> bool:
    """Whether parameter ``name`` lives on pipeline stage ``pp_rank``."""
    if name.startswith("decoder.layers."):
        return int(name.split(".")[2]) in layers
    if name.startswith(("decoder.norm", "decoder.output")):
        return pp_rank == pp - 1
    return pp_rank == 0  # vision, projector, coca, token embeddings


def estimate(cfg: RunConfig, dims: ParallelDims) -> list[RankMemory]:
    """Per curriculum stage and pipeline stage, the bytes one rank holds (see the module docstring)."""
    with torch.device("meta"):
        model = KimiVL(cfg.model)
    # The trainer's own split (parallel/pipeline.py's cost model), one stage per rank as in 1F1B.
    costs, first_extra, last_extra = layer_costs(cfg.model, max(s.seq_len for s in cfg.curriculum.stages.values()))
    splits = [range(stage[0], stage[-1] + 1) for stage in split_layers(costs, dims.pp_degree, first_extra,
                                                                        last_extra)]
    moe_names = {f"decoder.layers.{i}" for i, layer in model.decoder.layers.items() if layer.moe is not None}
    # Measured bytes per token, kept per process: the shapes of a flavor fix them (repeated dry runs reuse them).
    per_token = _MEASURED.setdefault(repr(cfg.model), {})
    reports = []
    for name in cfg.curriculum.order:
        stage = cfg.curriculum.stages[name]
        apply_stage(model, stage)
        policy = stage.activation_checkpoint or cfg.parallel.activation_checkpoint
        policy = default_policy(stage.seq_len) if policy == "auto" else policy
        stage_dims = dims.for_stage(stage.cp_degree, stage.seq_len)
        routes = {r.name: r for r in route_parameters(model)}
        for pp_rank, layers in enumerate(splits):
            params = grads = optimizer = 0
            for pname, param in model.named_parameters():
                if not _owned(pname, layers, pp_rank, dims.pp_degree):
                    continue
                is_expert = ".moe.experts." in pname
                numel = param.numel() // (dims.ep_degree if is_expert else 1)
                params += numel * FP32
                route = routes.get(pname)
                if route is None:  # frozen in this stage
                    continue
                grads += numel * FP32
                share = dims.expert_data_degree if is_expert else dims.dp_degree * dims.cp_degree
                optimizer += math.ceil(numel / share) * (FP32 if route.rule == MUON else 2 * FP32)
            activations = _activations(cfg.model, stage, stage_dims, pp_rank, layers, moe_names, policy, per_token)
            reports.append(RankMemory(name, pp_rank, layers, params, grads, optimizer, activations,
                                      stage_dims.cp_degree, policy))
    return reports


def _activations(args: ModelArgs, stage: StageConfig, dims: ParallelDims, pp_rank: int, layers: range,
                 moe_names: set[str], policy: str, per_token: dict) -> int:
    def measured(kind: str) -> float:
        if (kind, policy) not in per_token:
            if kind == "vision":
                per_token[kind, policy] = vision_block_activation_bytes_per_token(args.vision, policy)
            else:
                per_token[kind, policy] = decoder_layer_activation_bytes_per_token(args.decoder, kind == "moe", policy)
        return per_token[kind, policy]

    in_flight = dims.pp_degree - pp_rank  # 1F1B: stage s holds at most pp - s micro-batches' activations
    merge = args.vision.merge_size ** 2
    if stage.objective == "coca":
        patches = stage.micro_batch_size * stage.max_image_patches
        return int(patches * measured("vision") * args.vision.num_layers) if pp_rank == 0 else 0
    tokens = stage.micro_batch_size * stage.seq_len // dims.cp_degree
    total = sum(tokens * measured("moe" if f"decoder.layers.{i}" in moe_names else "dense") for i in layers)
    if pp_rank == 0:
        # Image tokens are merged 2 x 2 patches; the multimodal share bounds how many of the tokens are images.
        share = max(stage.mixture.multimodal_share_start, stage.mixture.multimodal_share_end)
        # Images of whole rows, divided among the context ranks (parallel/context.py).
        patches = stage.micro_batch_size * stage.seq_len * share * merge / dims.cp_degree
        total += patches * measured("vision") * args.vision.num_layers
    if pp_rank == dims.pp_degree - 1:
        total += 2 * tokens * args.decoder.vocab_size * FP32  # logits and their gradient
    return int(total * in_flight)


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
          f"ep={dims.ep_degree} (expert-data {dims.expert_data_degree}), activation checkpointing "
          f"'{cfg.parallel.activation_checkpoint}'")
    print(f"{'stage':<16}{'pp':>3} {'layers':>9} {'params GiB':>11} {'grads GiB':>10} {'optim GiB':>10} "
          f"{'activ GiB':>10} {'total GiB':>10}  cp  checkpointing")
    for r in reports:
        print(f"{r.stage:<16}{r.pp_rank:>3} {r.layers.start:>4}-{r.layers.stop - 1:<4} {r.params / GIB:>11.2f} "
              f"{r.grads / GIB:>10.2f} {r.optimizer / GIB:>10.2f} {r.activations / GIB:>10.2f} "
              f"{r.total / GIB:>10.2f} {r.cp_degree:>3}  {r.policy}")
    limit = cfg.device_memory_gb * GIB
    over = [r for r in reports if limit and r.total > limit]
    if over:
        worst = max(over, key=lambda r: r.total)
        raise ConfigError(f"stage '{worst.stage}' needs {worst.total / GIB:.1f} GiB on pipeline rank "
                          f"{worst.pp_rank}, over device_memory_gb={cfg.device_memory_gb}: raise parallel.pp_degree, "
                          "ep_degree or cp_degree, use parallel.activation_checkpoint=full, or lower the stage's "
                          "micro_batch_size.")
    return 0
