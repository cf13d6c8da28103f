"""The configuration schema (typed dataclasses) and its loading from the Hydra recipes.

YAML under ``recipes/`` only composes and overrides; these dataclasses say which keys exist, their types and
defaults. ``load_config`` composes a recipe with command-line overrides, checks every key and value, and raises
:class:`ConfigError` naming the key and what is allowed -- before any process group or allocation exists.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from data.augment import AugmentConfig
from model.args import ModelArgs
from model.hf_config import HFConfigError, model_args_from_recipe
from model.registry import FLAVORS

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
OBJECTIVES = ("coca", "lm")
TRAINABLE_PARTS = ("vision", "projector", "decoder", "coca")
LR_DECAYS = ("constant", "linear", "cosine", "wsd")
ACTIVATION_CHECKPOINT_POLICIES = ("auto", "none", "selective", "full")
DEVICES = ("auto", "cpu", "cuda")
MISSING_SOURCES = ("error", "drop")
STAGE_OBJECTIVE_PARTS = {"coca": ("vision", "coca"), "lm": ("vision", "projector", "decoder")}


class ConfigError(ValueError):
    """An invalid recipe: the message names the key and what would be accepted."""


@dataclass
class LRScheduleConfig:
    """Per-stage learning-rate schedule: linear warmup to ``peak_lr``, then ``decay`` down to
    ``peak_lr * min_lr_ratio`` at the stage's last step."""

    peak_lr: float = 3e-4
    warmup_steps: int = 0
    # constant | linear | cosine | wsd (optim/schedules.py)
    decay: str = "cosine"
    min_lr_ratio: float = 0.1
    # wsd: the share of the stage (after warmup) spent decaying.
    decay_fraction: float = 0.2
    # Start from the previous stage's final learning rate (no warmup; peak_lr unused).
    continue_previous: bool = False


@dataclass
class MixtureConfig:
    """Which data sources a stage draws from, as a function of stage progress ``p`` in [0, 1].

    A sample is drawn from ``long_sources`` with probability ``long_share``; otherwise ("replay") it is multimodal
    with probability ``multimodal_share_start + p * (multimodal_share_end - multimodal_share_start)`` (the report's
    ramp) and text-only otherwise. Weights inside each group are relative.
    """

    text_sources: dict[str, float] = field(default_factory=lambda: {"text": 1.0})
    multimodal_sources: dict[str, float] = field(default_factory=dict)
    multimodal_share_start: float = 0.0
    multimodal_share_end: float = 0.0
    long_sources: dict[str, float] = field(default_factory=dict)
    long_share: float = 0.0


@dataclass
class StageConfig:
    """One curriculum stage."""

    # "coca": SigLIP + 2 x caption loss on image-text pairs; "lm": next-token loss of the whole VLM on packed rows.
    objective: str = "lm"
    steps: int = 100
    seq_len: int = 8192
    # Per rank and micro step: packed rows ("lm") or image-text pairs ("coca").
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    trainable: list[str] = field(default_factory=lambda: ["vision", "projector", "decoder"])
    rope_theta: float = 50000.0
    # "previous": weights of the previous stage's final checkpoint; "scratch": fresh init; else a checkpoint dir.
    # Or per part, e.g. {vision: vit_coca, projector: scratch, decoder: "hf:/ckpts/Moonlight", coca: drop}: sources
    # are scratch | drop | previous | an earlier stage's name | a checkpoint path or s3:// URL | hf:DIR
    # (train/init_from.py).
    init_from: Any = "previous"
    # Pixel cap: at most this many ViT patches per image (larger images are downscaled, aspect kept).
    max_image_patches: int = 4096
    # Progressive resolution: the cap starts here and grows to max_image_patches in 16 equal steps (0: no ramp).
    min_image_patches: int = 0
    # Caption length for the CoCa objective (tokens, with bos/eos).
    max_text_len: int = 64
    lr: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Save a checkpoint every this many steps (0: only at the end of the stage).
    checkpoint_interval: int = 0
    # This stage's context-parallel degree (0: parallel.cp_degree): the data x context ranks are regrouped, e.g.
    # data parallel at 8K and cp=16 at 128K. Its activation checkpointing policy ("": parallel.activation_checkpoint).
    cp_degree: int = 0
    activation_checkpoint: str = ""


@dataclass
class CurriculumConfig:
    order: list[str] = field(default_factory=list)
    stages: dict[str, StageConfig] = field(default_factory=dict)


@dataclass
class DataConfig:
    # Where manifest.json, tokenizer.json and the shards are: a folder (or file://...) or s3://bucket/prefix.
    root: str = "demo_data"
    # S3: endpoint of a non-AWS server (empty: AWS), region, attempts per request. Credentials come only from the
    # standard chain (environment, config files, instance roles), never from the recipe.
    endpoint_url: str = ""
    region: str = ""
    max_attempts: int = 8
    # Generate the embedded synthetic corpus into ``root`` when it has no manifest yet.
    generate_if_missing: bool = True
    # Corrupt samples are skipped and counted; more than this fraction of draws aborts the run.
    max_corrupt_fraction: float = 0.01
    # S3: per-process request-rate limit (0: none) and the burst allowed above it; throttling halves the rate,
    # which then recovers. Retries count against the limit.
    requests_per_second: float = 0.0
    request_burst: int = 32
    # S3: a local disk cache of whole shards ("": none), bounded in bytes (LRU), shared safely by the processes of
    # a node.
    cache_dir: str = ""
    cache_max_bytes: int = 16 * 2**30
    # Draws per slot read ahead on background threads (0: none), and the threads (they also read shard indexes
    # in parallel; with loader_workers the workers read ahead instead). Prefetch changes timing only, never the
    # stream.
    prefetch_samples: int = 8
    prefetch_threads: int = 4
    # Worker processes for the read-ahead (0: threads only), for when decoding and resizing need more than a core.
    loader_workers: int = 0
    # A shard listed in the manifest but missing from storage fails the run naming it, unless this skips (and
    # counts) it.
    skip_missing_shards: bool = False
    # Sources a stage's mixture names that the root lacks: "error" lists them all before training starts; "drop"
    # leaves them out of every mixture (the other weights renormalized) and fails for a stage left with none.
    missing_sources: str = "error"
    # What transparent pixels (RGBA, LA, palette or colour transparency) are composited onto: a colour name or
    # #rrggbb.
    alpha_background: str = "white"


@dataclass
class OptimConfig:
    """``muon``: Muon (Moonlight rule) for weight matrices, AdamW for the rest; ``adamw``: AdamW for everything.
    Both are ZeRO-1 sharded over the data-parallel group (optim/distributed.py)."""

    name: str = "muon"
    # AdamW (and Muon's non-matrix parameters).
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # Decoupled, same for Muon and AdamW (Muon's update is scaled to AdamW's RMS, so they share lr and decay).
    weight_decay: float = 0.1
    grad_clip_norm: float = 1.0
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    # Newton-Schulz precision: bfloat16 as in Moonlight; float32 for bitwise-tight comparisons.
    muon_ns_dtype: str = "bfloat16"
    # ZeRO-1 communication bucket: MiB of each rank's gradient/parameter segment per collective.
    reduce_bucket_mb: float = 64.0


@dataclass
class ParallelConfig:
    """Degrees of the ``pp x dp x cp`` mesh, with ``ep`` carved out of ``dp x cp`` (parallel/dims.py)."""

    # Data-parallel degree; -1 takes what the other degrees leave of the world.
    dp_degree: int = -1
    pp_degree: int = 1
    cp_degree: int = 1
    ep_degree: int = 1
    # Pipeline schedule (parallel/pipeline.py): gpipe | 1f1b | interleaved_1f1b | interleaved_zero_bubble |
    # zero_bubble (ZBV); the interleaved ones run pp_virtual_stages stages per rank.
    pp_schedule: str = "1f1b"
    pp_virtual_stages: int = 2
    # none | selective | full | auto (selective up to 32K-token rows, full beyond: parallel/activation_checkpoint.py)
    activation_checkpoint: str = "auto"
    # Context-parallel key/value exchange: allgather | ring (parallel/context.py)
    cp_attention: str = "allgather"


@dataclass
class CheckpointConfig:
    # Committed checkpoints kept per stage (older ones are deleted at each commit).
    keep_last: int = 2
    # Where checkpoints go: "" for the run directory (<run>/<stage>/checkpoints/step-XXXXXXXX), or a path or
    # s3://bucket/prefix holding <run_name>/<stage>/step-XXXXXXXX.
    url: str = ""
    # Write checkpoints in the background (staged in host memory at the step boundary, written by a thread over a
    # gloo group of its own); the last checkpoint of a stage and the one taken when leaving are always waited for.
    async_save: bool = False
    # S3: endpoint of a non-AWS server (empty: AWS), region, attempts per request; credentials come only from the
    # standard chain.
    endpoint_url: str = ""
    region: str = ""
    max_attempts: int = 8


@dataclass
class RuntimeConfig:
    # Where each rank computes: auto (cuda:$LOCAL_RANK when CUDA is available, else cpu) | cpu | cuda. CUDA runs
    # use NCCL, CPU runs gloo (train/runtime.py).
    device: str = "auto"


@dataclass
class LogConfig:
    progress_bar: bool = True
    # Weights & Biases (offline unless WANDB_MODE is set; credentials only ever come from the environment).
    wandb: bool = False
    wandb_project: str = "kimi-vl"
    # Peak FLOP/s of one device for MFU; 0 measures it with a matmul probe (CPU).
    peak_tflops: float = 0.0


@dataclass
class RunConfig:
    recipe: str = "debug"
    # A folder of your own recipes, searched after the package's (recipe/<name>.yaml, curriculum/, stage/, ...):
    # ``recipe_dir=DIR`` or ``python -m train --config-dir DIR``.
    recipe_dir: str = ""
    run_name: str = ""
    output_dir: str = "outputs"
    seed: int = 0
    # Leave after this many optimizer steps in this invocation (checkpointed; rerun to continue), as Megatron's
    # --exit-interval: fits a run into job time limits. 0 runs to the end.
    exit_after_steps: int = 0
    # A non-finite loss or gradient skips the update; this many in a row stop the run (last good checkpoint kept).
    max_nonfinite_steps: int = 3
    # Ranks the recipe is laid out for (0: none): the layout is validated at this size when no launcher says
    # otherwise (a launched run validates at its real WORLD_SIZE), and the dry run simulates it.
    world_size: int = 0
    # Dry run (train/dry_run.py): build the real model on meta under a fake process group of ``world_size`` ranks
    # and print per-rank memory per stage; fail if a rank needs more than ``device_memory_gb`` (0: no limit).
    dry_run: bool = False
    device_memory_gb: float = 0.0
    # Tokens whose logits exist at once in the next-token loss (fused with the output projection, train/loss.py):
    # at a 163,840-token vocabulary, 1024 tokens of fp32 logits are 0.63 GiB.
    loss_chunk_tokens: int = 1024
    # A Moonlight (DeepSeek-V3-format) Hugging Face directory: where kimi_vl_a3b's decoder starts (the report
    # initializes the LLM from an intermediate Moonlight checkpoint). Required by that recipe (??? there).
    moonlight_dir: str = ""
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / (self.run_name or self.recipe)


def available_recipes(recipe_dir: str = "") -> list[str]:
    folders = [RECIPES_DIR] + ([Path(recipe_dir)] if recipe_dir else [])
    return sorted({p.stem for folder in folders for p in (folder / "recipe").glob("*.yaml")})


def split_recipe_dir(overrides: list[str]) -> tuple[str, list[str]]:
    """The ``recipe_dir=DIR`` among the overrides (absolute), and the other overrides."""
    found = [o.split("=", 1)[1] for o in overrides if o.startswith("recipe_dir=")]
    rest = [o for o in overrides if not o.startswith("recipe_dir=")]
    return (str(Path(found[-1]).resolve()) if found and found[-1] else ""), rest


def compose_recipe(overrides: list[str], recipe_dir: str = "") -> DictConfig:
    """Compose ``recipes/config.yaml`` with Hydra and the given ``key=value`` overrides (untyped), searching
    ``recipe_dir`` (e.g. your own ``recipe/<name>.yaml``) after the package's recipes.

    An override whose value is a mapping replaces the mapping it names (``...mixture.multimodal_sources={caption:
    1.0}`` means exactly that source), where Hydra would merge it into the recipe's."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    if recipe_dir and not (Path(recipe_dir).is_dir()):
        raise ConfigError(f"Invalid value recipe_dir={recipe_dir!r}: allowed is an existing folder of recipes.")
    recipes = ", ".join(available_recipes(recipe_dir))
    GlobalHydra.instance().clear()
    try:
        replaced = [(o, _parsed_mapping(o)) for o in overrides]
        hydra_overrides = [_as_upsert(o, recipe_dir) for o, value in replaced if value is None]
        if recipe_dir:
            hydra_overrides.append(f"hydra.searchpath=[file://{Path(recipe_dir).resolve()}]")
        with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=hydra_overrides)
    except HydraException as error:
        raise ConfigError(f"{error}\nRecipes: {recipes} (recipe=<name>).") from None
    with open_dict(cfg):
        for override, value in replaced:
            if value is not None:
                OmegaConf.update(cfg, override.split("=", 1)[0].lstrip("+"), value, merge=False)
    if recipe_dir:
        with open_dict(cfg):
            cfg.recipe_dir = str(Path(recipe_dir).resolve())
    return cfg


def _parsed_mapping(override: str) -> dict | None:
    """The value of ``key={...}`` when ``key`` is a mapping of the schema (mixture weights), else None."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    key, _, value = override.partition("=")
    if not value.lstrip().startswith("{") or key.startswith("~") or not _is_mapping(key.lstrip("+")):
        return None
    parsed = OverridesParser.create().parse_override(override).value()
    return parsed if isinstance(parsed, dict) else None


def _is_mapping(dotted: str) -> bool:
    """Whether the schema's key ``dotted`` is a ``dict[...]`` of values (not a dataclass section)."""
    node: Any = RunConfig
    parts = dotted.split(".")
    for index, part in enumerate(parts):
        if typing.get_origin(node) is dict:
            node = typing.get_args(node)[1]
        elif dataclasses.is_dataclass(node):
            node = typing.get_type_hints(node).get(part, ModelArgs if part == "model" and index == 0 else None)
        else:
            return False
        if node is None:
            return False
    return typing.get_origin(node) is dict


def _as_upsert(override: str, recipe_dir: str = "") -> str:
    """``key=value`` becomes Hydra's ``++key=value`` (set, whether or not the YAML mentions the key) unless it picks
    a config group (``recipe=debug``). The typed schema, not the YAML, decides which keys exist: a misspelt key
    fails in :func:`to_run_config` with the allowed keys."""
    key = override.split("=", 1)[0]
    folders = [RECIPES_DIR] + ([Path(recipe_dir)] if recipe_dir else [])
    groups = {p.name for folder in folders for p in folder.iterdir() if p.is_dir()}
    if "=" not in override or key.startswith(("+", "~")) or key in groups:
        return override
    return "++" + override


def _typed(section: str, schema: Any, values: Any) -> Any:
    """Merge untyped ``values`` into the dataclass ``schema``; unknown keys and bad types become ConfigError."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values if values is not None else {})
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        allowed = _allowed_keys(schema, str(key))
        hint = f" Allowed keys here: {', '.join(allowed)}." if allowed else ""
        reason = str(error.msg).splitlines()[0]
        raise ConfigError(f"Invalid config key or value at '{section}.{key}': {reason}.{hint}") from None


def _allowed_keys(schema: Any, dotted: str) -> list[str]:
    """The field names of the dataclass that holds the last component of ``dotted`` (for the error message)."""
    node = schema if isinstance(schema, type) else type(schema)
    for part in dotted.split(".")[:-1]:
        if typing.get_origin(node) is dict:
            node = typing.get_args(node)[1]
        elif dataclasses.is_dataclass(node):
            node = typing.get_type_hints(node).get(part)
        else:
            return []
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def to_run_config(raw: DictConfig) -> RunConfig:
    """Turn a composed recipe into a validated :class:`RunConfig`."""
    try:
        raw = OmegaConf.to_container(raw, resolve=True)
    except OmegaConfBaseException as error:  # e.g. ${moonlight_dir} while moonlight_dir is ??? (required)
        reason = str(getattr(error, "msg", error)).splitlines()[0]
        required = reason.rpartition("Missing mandatory value: ")[2] if "Missing mandatory" in reason else ""
        where = getattr(error, "full_key", "?")
        if required:
            raise ConfigError(f"Missing required value {required} (used by {where}): set it on the command line, "
                              f"{required}=...") from None
        raise ConfigError(f"Cannot resolve '{where}': {reason}.") from None
    model_raw = raw.pop("model", {}) or {}
    try:  # a flavor, or hf:<dir> for the whole model or a part (model/hf_config.py)
        model_base, model_raw = model_args_from_recipe(model_raw, FLAVORS)
    except HFConfigError as error:
        raise ConfigError(str(error)) from None
    curriculum_raw = raw.pop("curriculum", {}) or {}
    cfg: RunConfig = _typed("", RunConfig, raw)
    cfg.model = _typed("model", model_base, model_raw)
    stages_raw = curriculum_raw.get("stages", {}) or {}
    order = list(curriculum_raw.get("order", []) or [])
    stages = {name: _typed(f"curriculum.stages.{name}", StageConfig, body) for name, body in stages_raw.items()}
    cfg.curriculum = CurriculumConfig(order=order, stages=stages)
    validate(cfg)
    return cfg


def load_config(overrides: list[str], recipe_dir: str = "") -> RunConfig:
    """Compose, type and validate a recipe: the single entry for the trainer, tests and tools. ``recipe_dir`` (or a
    ``recipe_dir=DIR`` override) is a folder of your own recipes, searched after the package's."""
    found, overrides = split_recipe_dir(overrides)
    return to_run_config(compose_recipe(overrides, found or recipe_dir))


def validate(cfg: RunConfig) -> None:
    """Check values that types cannot express; every message names the key and what is allowed."""
    _check(cfg.seed >= 0, "seed", cfg.seed, "an integer >= 0")
    _check(cfg.exit_after_steps >= 0, "exit_after_steps", cfg.exit_after_steps, "an integer >= 0 (0: no limit)")
    _check(cfg.max_nonfinite_steps >= 1, "max_nonfinite_steps", cfg.max_nonfinite_steps, "an integer >= 1")
    _check(cfg.optim.name in ("muon", "adamw"), "optim.name", cfg.optim.name, "'muon' or 'adamw'")
    _check(cfg.optim.muon_ns_dtype in ("bfloat16", "float32"), "optim.muon_ns_dtype", cfg.optim.muon_ns_dtype,
           "'bfloat16' or 'float32'")
    _check(0 <= cfg.optim.muon_momentum < 1, "optim.muon_momentum", cfg.optim.muon_momentum, "a value in [0, 1)")
    _check(cfg.optim.muon_ns_steps >= 1, "optim.muon_ns_steps", cfg.optim.muon_ns_steps, ">= 1")
    _check(cfg.optim.reduce_bucket_mb > 0, "optim.reduce_bucket_mb", cfg.optim.reduce_bucket_mb, "> 0")
    _check(cfg.optim.grad_clip_norm >= 0, "optim.grad_clip_norm", cfg.optim.grad_clip_norm, ">= 0 (0 disables)")
    _check(cfg.parallel.dp_degree == -1 or cfg.parallel.dp_degree >= 1, "parallel.dp_degree",
           cfg.parallel.dp_degree, "-1 (whole world) or >= 1")
    _check(cfg.parallel.cp_attention in ("allgather", "ring"), "parallel.cp_attention", cfg.parallel.cp_attention,
           "'allgather' or 'ring'")
    _check(cfg.parallel.activation_checkpoint in ACTIVATION_CHECKPOINT_POLICIES, "parallel.activation_checkpoint",
           cfg.parallel.activation_checkpoint, f"one of {ACTIVATION_CHECKPOINT_POLICIES}")
    _check(not cfg.dry_run or cfg.world_size >= 1, "world_size", cfg.world_size,
           "the number of ranks to simulate, >= 1 (with dry_run=true)")
    _check(cfg.device_memory_gb >= 0, "device_memory_gb", cfg.device_memory_gb, ">= 0 (0: no limit)")
    _check(cfg.loss_chunk_tokens >= 1, "loss_chunk_tokens", cfg.loss_chunk_tokens, "an integer >= 1")
    _check(cfg.log.peak_tflops >= 0, "log.peak_tflops", cfg.log.peak_tflops, ">= 0 (0: measure)")
    _check(cfg.runtime.device in DEVICES, "runtime.device", cfg.runtime.device, f"one of {DEVICES}")
    _check(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", cfg.checkpoint.keep_last, ">= 1")
    _check(cfg.checkpoint.max_attempts >= 1, "checkpoint.max_attempts", cfg.checkpoint.max_attempts, ">= 1")
    _check(not cfg.checkpoint.url.startswith("s3://") or len(cfg.checkpoint.url) > len("s3://")
           and not cfg.checkpoint.url[len("s3://"):].startswith("/"), "checkpoint.url", cfg.checkpoint.url,
           "'' (the run directory), a path, or s3://bucket[/prefix]")
    _check("://" not in cfg.checkpoint.url or cfg.checkpoint.url.startswith(("s3://", "file://")), "checkpoint.url",
           cfg.checkpoint.url, "'' (the run directory), a path, file://path or s3://bucket[/prefix]")
    _check(cfg.data.max_attempts >= 1, "data.max_attempts", cfg.data.max_attempts, "an integer >= 1")
    _check(0 <= cfg.data.max_corrupt_fraction <= 1, "data.max_corrupt_fraction", cfg.data.max_corrupt_fraction,
           "a fraction in [0, 1]")
    _check(cfg.data.missing_sources in MISSING_SOURCES, "data.missing_sources", cfg.data.missing_sources,
           f"one of {MISSING_SOURCES}")
    _check(_is_colour(cfg.data.alpha_background), "data.alpha_background", cfg.data.alpha_background,
           "a colour name (white, black, grey, ...) or #rrggbb")
    vision = cfg.model.vision
    _check(vision.hidden_size % vision.num_heads == 0 and (vision.hidden_size // vision.num_heads) % 4 == 0,
           "model.vision.num_heads", vision.num_heads,
           f"a divisor of hidden_size={vision.hidden_size} leaving a head dim divisible by 4 (2D RoPE)")
    _check(not cfg.curriculum.order == [], "curriculum.order", [], "a non-empty list of stage names")
    for name in cfg.curriculum.order:
        _check(name in cfg.curriculum.stages, "curriculum.order", name,
               f"names of defined stages: {', '.join(cfg.curriculum.stages)}")
    _check(len(set(cfg.curriculum.order)) == len(cfg.curriculum.order), "curriculum.order", cfg.curriculum.order,
           "each stage at most once")
    for index, name in enumerate(cfg.curriculum.order):
        _validate_stage(f"curriculum.stages.{name}", cfg.curriculum.stages[name], first=index == 0, cfg=cfg)
    _validate_layout(cfg)


def _validate_layout(cfg: RunConfig) -> None:
    """The parallel degrees against the model, the sequence lengths and (under torchrun) the world size."""
    from parallel.dims import ParallelDims  # imported here: parallel.dims builds on this module

    par = cfg.parallel
    launched = 0 if cfg.dry_run else int(os.environ.get("WORLD_SIZE", "0"))
    world = launched or cfg.world_size or par.pp_degree * max(par.dp_degree, 1) * par.cp_degree
    stages = [(name, cfg.curriculum.stages[name]) for name in cfg.curriculum.order]
    seq_lens = [stage.seq_len for _, stage in stages if not stage.cp_degree]
    dims = ParallelDims.from_config(par, world, cfg.model, seq_lens)
    for name, stage in stages:
        key = f"curriculum.stages.{name}"
        stage_dims = dims.for_stage(stage.cp_degree, stage.seq_len, key=f"{key}.cp_degree")
        _check(stage_dims.cp_degree == 1 or cfg.model.decoder.aux_loss_coef == 0, "model.decoder.aux_loss_coef",
               cfg.model.decoder.aux_loss_coef, f"0 when a stage uses context parallelism ({name}: cp="
               f"{stage_dims.cp_degree}); the sequence-wise balance loss needs whole rows: use the aux-loss-free "
               "bias balancing")
        _check(stage.activation_checkpoint in ("", *ACTIVATION_CHECKPOINT_POLICIES), f"{key}.activation_checkpoint",
               stage.activation_checkpoint, f"'' (the run's) or one of {ACTIVATION_CHECKPOINT_POLICIES}")


def _validate_stage(key: str, stage: StageConfig, first: bool, cfg: RunConfig) -> None:
    _check(stage.objective in OBJECTIVES, f"{key}.objective", stage.objective, f"one of {OBJECTIVES}")
    for knob in ("steps", "seq_len", "micro_batch_size", "grad_accum_steps", "max_image_patches", "max_text_len"):
        _check(getattr(stage, knob) >= 1, f"{key}.{knob}", getattr(stage, knob), "an integer >= 1")
    merge = cfg.model.vision.merge_size
    _check(stage.max_image_patches >= merge * merge, f"{key}.max_image_patches", stage.max_image_patches,
           f">= {merge * merge} (one merged token)")
    _check(0 <= stage.min_image_patches <= stage.max_image_patches, f"{key}.min_image_patches",
           stage.min_image_patches, f"0 (no ramp) up to max_image_patches={stage.max_image_patches}")
    _check(stage.checkpoint_interval >= 0, f"{key}.checkpoint_interval", stage.checkpoint_interval, ">= 0")
    _check(stage.rope_theta > 0, f"{key}.rope_theta", stage.rope_theta, "> 0")
    bad = [part for part in stage.trainable if part not in TRAINABLE_PARTS]
    _check(not bad, f"{key}.trainable", bad, f"parts among {TRAINABLE_PARTS}")
    _check(bool(stage.trainable), f"{key}.trainable", stage.trainable, "at least one part")
    used = STAGE_OBJECTIVE_PARTS[stage.objective]
    idle = [part for part in stage.trainable if part not in used]
    _check(not idle, f"{key}.trainable", idle,
           f"parts the '{stage.objective}' objective uses: {used} (the others get no gradient)")
    _check(stage.init_from != "previous" or not first, f"{key}.init_from", stage.init_from,
           "'scratch' or a checkpoint directory for the first stage (there is no previous stage)")
    _validate_init_from(key, stage, cfg)
    lr = stage.lr
    _check(lr.peak_lr > 0, f"{key}.lr.peak_lr", lr.peak_lr, "> 0")
    _check(0 <= lr.warmup_steps <= stage.steps, f"{key}.lr.warmup_steps", lr.warmup_steps,
           f"between 0 and steps={stage.steps}")
    _check(lr.decay in LR_DECAYS, f"{key}.lr.decay", lr.decay, f"one of {LR_DECAYS}")
    _check(0 <= lr.min_lr_ratio <= 1, f"{key}.lr.min_lr_ratio", lr.min_lr_ratio, "a ratio in [0, 1]")
    _check(0 < lr.decay_fraction <= 1, f"{key}.lr.decay_fraction", lr.decay_fraction, "a fraction in (0, 1]")
    _check(not (lr.continue_previous and first), f"{key}.lr.continue_previous", lr.continue_previous,
           "false for the first stage (there is no previous schedule)")
    _validate_mixture(f"{key}.mixture", stage.mixture, stage.objective)
    aug = stage.augment
    _check(0 < aug.crop_min_scale <= 1, f"{key}.augment.crop_min_scale", aug.crop_min_scale, "a share in (0, 1]")
    _check(0 <= aug.crop_min_visible <= 1, f"{key}.augment.crop_min_visible", aug.crop_min_visible,
           "a share in [0, 1]")
    _check(0 <= aug.flip_prob <= 1, f"{key}.augment.flip_prob", aug.flip_prob, "a probability in [0, 1]")
    _check(0 <= aug.max_rotation_deg <= 180, f"{key}.augment.max_rotation_deg", aug.max_rotation_deg,
           "degrees in [0, 180]")
    for knob in ("resize_jitter", "color_jitter"):
        _check(0 <= getattr(aug, knob) < 1, f"{key}.augment.{knob}", getattr(aug, knob), "a value in [0, 1)")


def _validate_init_from(key: str, stage: StageConfig, cfg: RunConfig) -> None:
    from train.init_from import parse_init_from  # train.init_from reads checkpoints: imported when needed

    order = cfg.curriculum.order
    name = key.rpartition(".")[2]
    try:
        parse_init_from(stage.init_from, order[:order.index(name)], order, list(cfg.curriculum.stages))
    except ValueError as error:
        raise ConfigError(f"Invalid value {key}.init_from={stage.init_from!r}: {error}.") from None


def _validate_mixture(key: str, mix: MixtureConfig, objective: str) -> None:
    for share in ("multimodal_share_start", "multimodal_share_end", "long_share"):
        value = getattr(mix, share)
        _check(0 <= value <= 1, f"{key}.{share}", value, "a share in [0, 1]")
    for group in ("text_sources", "multimodal_sources", "long_sources"):
        weights = getattr(mix, group)
        negative = {k: v for k, v in weights.items() if v < 0}
        _check(not negative, f"{key}.{group}", negative, "weights >= 0")
    if objective == "coca":
        _check(sum(mix.multimodal_sources.values()) > 0, f"{key}.multimodal_sources", mix.multimodal_sources,
               "image-text sources with positive weight (the CoCa objective needs images)")
        return
    needs_text = mix.multimodal_share_start < 1 or mix.multimodal_share_end < 1
    _check(not needs_text or sum(mix.text_sources.values()) > 0, f"{key}.text_sources", mix.text_sources,
           "positive weights (the multimodal share is below 1, so text samples are drawn)")
    needs_mm = mix.multimodal_share_start > 0 or mix.multimodal_share_end > 0
    _check(not needs_mm or sum(mix.multimodal_sources.values()) > 0, f"{key}.multimodal_sources",
           mix.multimodal_sources, "positive weights (the multimodal share is above 0)")
    _check(mix.long_share == 0 or sum(mix.long_sources.values()) > 0, f"{key}.long_sources", mix.long_sources,
           "positive weights (long_share is above 0)")


def _is_colour(colour: str) -> bool:
    from PIL import ImageColor

    try:
        ImageColor.getrgb(colour)
    except ValueError:
        return False
    return True


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"Invalid value {key}={value!r}: allowed is {allowed}.")
