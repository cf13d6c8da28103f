"""The pieces of a run, each built by one function with one contract; the trainer (train/trainer.py) composes them.

Built once per run, in this order (every rank calls each builder in the same order: they create process groups):

* :func:`build_runtime`: the process group, the layout (:class:`~parallel.dims.ParallelDims`) and its groups;
* :func:`build_data`: the data root's storage and tokenizer (the root must hold a manifest: nothing is generated);
* :func:`build_model`: the model, built on ``meta`` and parallelized onto this rank's device.

Built per curriculum stage: :func:`enter_stage_layout` (the stage's context-parallel layout), :func:`build_feed`
(loader and device feed), :func:`build_optimizer`, and for checkpoints :func:`checkpoint_state` (what is saved and
restored) and :func:`checkpoint_info` (what the checkpoint says about itself).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from config import OptimConfig, PrecisionConfig, RunConfig, StageConfig
from config.validate import check_layout
from data.loader import StageLoader
from data.tokenizer import TextTokenizer
from model.vlm import KimiVL
from optim.distributed import ZeroOptimizer, shards_micro_batches
from optim.muon import AdamWHParams, MuonHParams
from parallel.dims import ParallelDims, ParallelGroups
from parallel.parallelize import ParallelModel, PipelineOptions, parallelize
from storage import Storage, build_storage
from train.checkpoint import ModelState, RNGState
from train.device_feed import DeviceFeed
from train.loss import linear_cross_entropy_by_group
from train.preflight import load_checked_tokenizer, read_root_manifest
from train.runtime import init_distributed
from train.stages import check_init_sources

__all__ = ["DataSource", "Runtime", "StageLayout", "build_data", "build_feed", "build_model", "build_optimizer",
           "build_runtime", "checkpoint_info", "checkpoint_state", "data_shard", "enter_stage_layout"]


@dataclass
class Runtime:
    """This rank in the run: its device, rank and world, the run's layout and this rank's process groups.

    Attributes:
        checkpoint_group: A gloo group of its own for background checkpoint writes (None: saves block), so they
            never interleave with training collectives.
        cp_groups: Context-parallel groups by degree, the layout's own first; stages with another degree add
            theirs (:func:`enter_stage_layout`).
    """

    device: torch.device
    rank: int
    world: int
    dims: ParallelDims
    groups: ParallelGroups
    checkpoint_group: dist.ProcessGroup | None = None
    cp_groups: dict[int, dist.ProcessGroup | None] = field(default_factory=dict)


@dataclass
class DataSource:
    """The data root every stage reads: its storage (S3 behind the rate limit and disk cache the recipe sets) and
    its tokenizer (checked against the model's vocabulary)."""

    storage: Storage
    tokenizer: TextTokenizer


@dataclass
class StageLayout:
    """A curriculum stage's layout: the run's, with the stage's own context-parallel degree (same ranks)."""

    dims: ParallelDims
    cp_group: dist.ProcessGroup | None  # None when the stage has no context parallelism


def _seq_lens(cfg: RunConfig) -> list[int]:
    return [cfg.curriculum.stages[n].seq_len for n in cfg.curriculum.order]


def build_runtime(cfg: RunConfig, device: torch.device) -> Runtime:
    """Join (or form) the process group on ``device``'s backend, check the layout at the world size found, and
    create every process group of this rank.

    Raises:
        ConfigError: The recipe's degrees do not fit the world size.
    """
    init_distributed(device)
    world = dist.get_world_size()
    check_layout(cfg, world)
    dims = ParallelDims.from_config(cfg.parallel, world, cfg.model, _seq_lens(cfg))
    groups = dims.build_groups(device.type)
    checkpoint_group = dist.new_group(backend="gloo") if cfg.checkpoint.async_save else None
    return Runtime(device, dist.get_rank(), world, dims, groups, checkpoint_group, {dims.cp_degree: groups.cp})


def build_data(cfg: RunConfig) -> DataSource:
    """The storage of ``data.root`` and the tokenizer its manifest names.

    Raises:
        DataError: The root has no manifest (the demo corpus is made by ``python -m data.synthetic``) or no
            loadable tokenizer.
        ConfigError: The tokenizer has more tokens than the model's vocabulary.
    """
    storage = build_storage(cfg.data)
    manifest = read_root_manifest(cfg.data, storage)
    return DataSource(storage, load_checked_tokenizer(cfg, manifest, storage))


def build_model(cfg: RunConfig, runtime: Runtime) -> ParallelModel:
    """The model of ``cfg.model`` built on ``meta``, then sharded, pruned, placed and initialized for this rank
    (parallel/parallelize.py); a pipeline's last stage takes the fused next-token loss of train/loss.py.

    Raises:
        ConfigError: A stage's ``init_from`` source (Hugging Face or checkpoint) does not fit the model.
    """
    check_init_sources(cfg)  # every stage's hf: and checkpoint sources: names and shapes, before any step
    torch.manual_seed(cfg.seed)
    with torch.device("meta"):  # nothing is allocated before this rank's share is known
        model = KimiVL(cfg.model)
    pipeline = PipelineOptions(cfg.parallel.pp_schedule, cfg.parallel.pp_virtual_stages, max(_seq_lens(cfg)),
                               functools.partial(linear_cross_entropy_by_group, chunk_tokens=cfg.loss_chunk_tokens))
    return parallelize(model, runtime.dims, runtime.groups, runtime.device, cfg.seed, pipeline,
                       param_dtype=getattr(torch, cfg.precision.param_dtype), compile=cfg.compile)


def enter_stage_layout(runtime: Runtime, parallel: ParallelModel, stage: StageConfig, cfg: RunConfig) -> StageLayout:
    """Regroup the same ranks for ``stage``'s context-parallel degree (groups are made once per degree, every rank
    in the same order) and apply its attention cores and activation-checkpointing policy to the model."""
    dims = runtime.dims.for_stage(stage.cp_degree, stage.seq_len)
    cp = dims.cp_degree
    if cp not in runtime.cp_groups:  # every rank runs the same stages in the same order: groups line up
        runtime.cp_groups[cp] = dims.build_cp_group()
    cp_group = runtime.cp_groups[cp] if cp > 1 else None
    parallel.apply_stage(cp_group, stage.activation_checkpoint or cfg.parallel.activation_checkpoint, stage.seq_len,
                         cfg.parallel.cp_attention)
    return StageLayout(dims, cp_group)


def data_shard(stage: StageConfig, dims: ParallelDims, rank: int) -> tuple[int, int]:
    """``(rank, size)`` of this rank's share of the global batch. Context-parallel ranks split the tokens of
    the same rows; the CoCa objective has no token sequence to split (whole images), so there they serve
    batch slots of their own, like data-parallel ranks."""
    coords = dims.coordinates(rank)
    if stage.objective == "coca":
        return coords["dp"] * dims.cp_degree + coords["cp"], dims.dp_degree * dims.cp_degree
    return coords["dp"], dims.dp_degree


def build_feed(name: str, stage: StageConfig, cfg: RunConfig, data: DataSource, runtime: Runtime,
               layout: StageLayout) -> DeviceFeed:
    """The stage's loader (this rank's share of the global batch) behind a feed that hands out one step's
    micro-batches on the rank's device; close it with ``feed.loader.close()``."""
    loader = StageLoader(name, stage, cfg.data, data.storage, data.tokenizer, cfg.model.vision, cfg.seed,
                         data_shard(stage, layout.dims, runtime.rank))
    return DeviceFeed(loader, stage.objective, stage.grad_accum_steps, runtime.device)


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float, groups: ParallelGroups | None = None,
                    precision: PrecisionConfig | None = None, pipelined: bool = False) -> ZeroOptimizer:
    """The stage's optimizer over the trainable parameters only (frozen ones are never touched, not even by weight
    decay), ZeRO-1 sharded: dense state over the data x context ranks, expert state over the expert-data ranks,
    the gradient norm over the whole world; gradients reduced and state stored in ``precision``'s dtypes, micro-batches
    accumulated sharded where :func:`~optim.distributed.shards_micro_batches` says (not ``pipelined``)."""
    precision = precision or PrecisionConfig()
    param_dtype, reduce_dtype = (getattr(torch, d) for d in (precision.param_dtype, precision.reduce_dtype))
    muon = MuonHParams(momentum=cfg.muon_momentum, nesterov=cfg.muon_nesterov, ns_steps=cfg.muon_ns_steps,
                       ns_dtype=getattr(torch, cfg.muon_ns_dtype))
    adamw = AdamWHParams(beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps)
    return ZeroOptimizer(model, lr=lr, weight_decay=cfg.weight_decay, use_muon=cfg.name == "muon", muon=muon,
                         adamw=adamw, group=groups.dense if groups else dist.group.WORLD,
                         expert_group=groups.expert_data if groups else None, norm_group=dist.group.WORLD,
                         bucket_elements=max(1, int(cfg.reduce_bucket_mb * 2**20) // 4), reduce_dtype=reduce_dtype,
                         state_dtype=getattr(torch, precision.optimizer_state_dtype),
                         accumulate_sharded=shards_micro_batches(param_dtype, reduce_dtype, pipelined))


def checkpoint_state(model: nn.Module, runtime: Runtime, optimizer: ZeroOptimizer, train: Stateful,
                     feed: DeviceFeed) -> dict[str, Stateful]:
    """Everything a checkpoint saves and a resume restores, by key (the checkpoint format)."""
    return {
        "model": ModelState(model, runtime.groups.expert_mesh),
        "optim": optimizer,
        "train": train,
        # The loader's state as of the batches trained on; one state per global-batch slot: a checkpoint
        # resumes at another data-parallel size.
        "loader": feed,
        # Ranks start from the same seed and draw no rank-specific randomness, so one generator state serves all.
        "rng": RNGState(runtime.device),
    }


def checkpoint_info(cfg: RunConfig, name: str, stage: StageConfig, step: int, tokens: int, layout: StageLayout,
                    world: int) -> dict[str, Any]:
    """What a checkpoint holds, readable without the run directory (``checkpoint.json``): evaluation takes the
    RoPE base, sequence length and model from here."""
    dims = layout.dims
    return {"stage": name, "step": step, "tokens": tokens, "objective": stage.objective,
            "seq_len": stage.seq_len, "rope_theta": stage.rope_theta, "trainable": list(stage.trainable),
            "layout": {"world_size": world, "dp": dims.dp_degree, "cp": dims.cp_degree,
                       "ep": dims.ep_degree, "pp": dims.pp_degree},
            "config": OmegaConf.to_container(OmegaConf.structured(cfg))}
