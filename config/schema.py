"""The configuration schema: typed dataclasses saying which keys exist, their types and defaults.

YAML under ``recipes/`` only composes and overrides (config/load.py); every value is checked in config/validate.py,
before any process group or allocation exists. This package imports nothing else of the project.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config.model import ModelArgs

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
OBJECTIVES = ("coca", "lm")
TRAINABLE_PARTS = ("vision", "projector", "decoder", "coca")
LR_DECAYS = ("constant", "linear", "cosine", "wsd")
ACTIVATION_CHECKPOINT_POLICIES = ("auto", "none", "selective", "full")
DEVICES = ("auto", "cpu", "cuda")
MISSING_SOURCES = ("error", "drop")
STAGE_OBJECTIVE_PARTS = {"coca": ("vision", "coca"), "lm": ("vision", "projector", "decoder")}
# Pipeline schedule -> stages per rank (None: ``parallel.pp_virtual_stages``); parallel/pipeline.py maps each name to
# its torch.distributed.pipelining class.
PIPELINE_SCHEDULES: dict[str, int | None] = {"gpipe": 1, "1f1b": 1, "interleaved_1f1b": None,
                                             "interleaved_zero_bubble": None, "zero_bubble": 2}
CP_METHODS = ("allgather", "ring")
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """An invalid recipe: the message names the key and what would be accepted."""


@dataclass
class AugmentConfig:
    """Per-stage augmentation; each transform is skipped when its strength is 0."""

    enabled: bool = False
    # Sample kinds to augment: those whose text stays true under flips and crops (grounding boxes move with the
    # pixels; a caption saying "top left" or rendered text would not).
    kinds: list[str] = field(default_factory=lambda: ["grounding"])
    # Keep at least this share of each side in a random crop (1.0: no crop).
    crop_min_scale: float = 0.8
    # Objects with less than this share of their box inside the crop are dropped (a sliver is no longer them).
    crop_min_visible: float = 0.3
    flip_prob: float = 0.5
    max_rotation_deg: float = 10.0
    # Resize by a factor drawn from [1 - resize_jitter, 1 + resize_jitter].
    resize_jitter: float = 0.2
    # Brightness, contrast and saturation factors drawn from [1 - color_jitter, 1 + color_jitter].
    color_jitter: float = 0.2


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
    # Where manifest.json, tokenizer.json and the shards are: a folder (or file://...) or s3://bucket/prefix. The
    # default is where `python -m data.synthetic` writes the demo corpus.
    root: str = "demo_data"
    # S3: endpoint of a non-AWS server (empty: AWS), region, attempts per request. Credentials come only from the
    # standard chain (environment, config files, instance roles), never from the recipe.
    endpoint_url: str = ""
    region: str = ""
    max_attempts: int = 8
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
    # ZeRO-1 communication bucket: MiB (of fp32 elements) per reduce-scatter / all-gather, all ranks' slices
    # together, so the step's buffers stay bounded at any world size.
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
class PrecisionConfig:
    """Mixed precision (optim/distributed.py): the model's parameters and activations in ``param_dtype``; each rank
    keeps fp32 master weights and the optimizer state of the pieces it owns. Norm statistics, attention softmax, the
    router, RoPE tables and the losses are fp32 whatever these say."""

    # float32 | bfloat16
    param_dtype: str = "float32"
    # The dtype gradients accumulate over micro-batches in and are reduce-scattered in.
    reduce_dtype: str = "float32"
    # Muon momentum and AdamW moments (updated in fp32, stored in this dtype).
    optimizer_state_dtype: str = "float32"


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
class RecoveryConfig:
    """Automatic loss-spike recovery (train/recovery.py): off unless a spike factor is set.

    A step whose loss exceeds ``loss_spike_factor`` x the mean of the last ``window`` trained steps' losses (or whose
    gradient norm exceeds ``grad_spike_factor`` x their mean) is a spike: every rank rolls back to the last
    checkpoint before it, the ``skip_steps`` steps from the spike on are skipped (their data drawn and never
    trained on), and training continues. Past ``max_rollbacks_per_stage`` rollbacks in a stage the run stops.

    A spike can start before the step that crosses the threshold (a loss or a gradient norm climbing, or a fault that
    corrupted a weight a few steps earlier), so the ``spike_window`` steps before a detected spike are suspect: the
    rollback goes to a checkpoint taken before them, and checkpoint retention keeps one such checkpoint besides the
    last ``checkpoint.keep_last`` (train/checkpoint.py, :func:`retained_steps`).
    """

    loss_spike_factor: float = 0.0  # 0: loss spikes are not detected
    grad_spike_factor: float = 0.0  # 0: gradient-norm spikes are not detected
    window: int = 50
    max_rollbacks_per_stage: int = 3
    skip_steps: int = 1
    # Steps before a detected spike whose checkpoints are not trusted (0: the last checkpoint before the spike is).
    spike_window: int = 10

    @property
    def enabled(self) -> bool:
        return self.loss_spike_factor > 0 or self.grad_spike_factor > 0


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
    # Compile every transformer block (decoder layers, MoonViT and CoCa blocks) with torch.compile (Inductor), inside
    # the activation checkpointing (parallel/compile.py). Layouts it does not run are refused when the recipe loads.
    compile: bool = False
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
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / (self.run_name or self.recipe)
