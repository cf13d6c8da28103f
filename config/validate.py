"""Every check of a run's configuration, run when it is loaded: before any process group, allocation or read.

Each failure is one :class:`ConfigError` naming the key, the value and what would be accepted. The layout checks
(degrees against the world size, the model and the sequence lengths; the pipeline schedule) work on plain numbers,
so ``--print-config`` and the dry run reject what a launched run would.
"""

from __future__ import annotations

import os
from typing import Any

from config.init_sources import parse_init_from
from config.model import ModelArgs
from config.schema import (
    ACTIVATION_CHECKPOINT_POLICIES,
    CP_METHODS,
    DEVICES,
    DTYPES,
    LR_DECAYS,
    MISSING_SOURCES,
    OBJECTIVES,
    PIPELINE_SCHEDULES,
    STAGE_OBJECTIVE_PARTS,
    TRAINABLE_PARTS,
    ConfigError,
    MixtureConfig,
    ParallelConfig,
    RunConfig,
    StageConfig,
)

__all__ = ["check_degrees", "check_layout", "check_stage_cp_degree", "divisors", "validate"]


def validate(cfg: RunConfig) -> None:
    """Check values that types cannot express; every message names the key and what is allowed."""
    _check(cfg.seed >= 0, "seed", cfg.seed, "an integer >= 0")
    _check(cfg.exit_after_steps >= 0, "exit_after_steps", cfg.exit_after_steps, "an integer >= 0 (0: no limit)")
    _check(cfg.max_nonfinite_steps >= 1, "max_nonfinite_steps", cfg.max_nonfinite_steps, "an integer >= 1")
    _check_recovery(cfg)
    _check(cfg.optim.name in ("muon", "adamw"), "optim.name", cfg.optim.name, "'muon' or 'adamw'")
    _check(cfg.optim.muon_ns_dtype in ("bfloat16", "float32"), "optim.muon_ns_dtype", cfg.optim.muon_ns_dtype,
           "'bfloat16' or 'float32'")
    _check(0 <= cfg.optim.muon_momentum < 1, "optim.muon_momentum", cfg.optim.muon_momentum, "a value in [0, 1)")
    _check(cfg.optim.muon_ns_steps >= 1, "optim.muon_ns_steps", cfg.optim.muon_ns_steps, ">= 1")
    _check(cfg.optim.reduce_bucket_mb > 0, "optim.reduce_bucket_mb", cfg.optim.reduce_bucket_mb, "> 0")
    _check(cfg.optim.grad_clip_norm >= 0, "optim.grad_clip_norm", cfg.optim.grad_clip_norm, ">= 0 (0 disables)")
    _check(cfg.parallel.dp_degree == -1 or cfg.parallel.dp_degree >= 1, "parallel.dp_degree",
           cfg.parallel.dp_degree, "-1 (whole world) or >= 1")
    _check(cfg.parallel.cp_attention in CP_METHODS, "parallel.cp_attention", cfg.parallel.cp_attention,
           f"one of {CP_METHODS}")
    _check(cfg.parallel.activation_checkpoint in ACTIVATION_CHECKPOINT_POLICIES, "parallel.activation_checkpoint",
           cfg.parallel.activation_checkpoint, f"one of {ACTIVATION_CHECKPOINT_POLICIES}")
    _check(not cfg.dry_run or cfg.world_size >= 1, "world_size", cfg.world_size,
           "the number of ranks to simulate, >= 1 (with dry_run=true)")
    _check(cfg.device_memory_gb >= 0, "device_memory_gb", cfg.device_memory_gb, ">= 0 (0: no limit)")
    _check(cfg.loss_chunk_tokens >= 1, "loss_chunk_tokens", cfg.loss_chunk_tokens, "an integer >= 1")
    _check(cfg.log.peak_tflops >= 0, "log.peak_tflops", cfg.log.peak_tflops, ">= 0 (0: measure)")
    for knob in ("param_dtype", "reduce_dtype", "optimizer_state_dtype"):
        _check(getattr(cfg.precision, knob) in DTYPES, f"precision.{knob}", getattr(cfg.precision, knob),
               f"one of {DTYPES}")
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
    _check(cfg.data.requests_per_second >= 0, "data.requests_per_second", cfg.data.requests_per_second,
           ">= 0 (0: no limit)")
    _check(cfg.data.request_burst >= 1, "data.request_burst", cfg.data.request_burst, "an integer >= 1")
    _check(cfg.data.cache_max_bytes >= 0, "data.cache_max_bytes", cfg.data.cache_max_bytes, ">= 0")
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
    par = cfg.parallel
    launched = 0 if cfg.dry_run else int(os.environ.get("WORLD_SIZE", "0"))
    check_layout(cfg, launched or cfg.world_size or par.pp_degree * max(par.dp_degree, 1) * par.cp_degree)


def check_layout(cfg: RunConfig, world: int) -> None:
    """The parallel degrees against a world of ``world`` ranks, the model, the sequence lengths and the pipeline
    schedule (run by :func:`validate`, and again by the trainer at the world size it finds)."""
    par = cfg.parallel
    stages = [(name, cfg.curriculum.stages[name]) for name in cfg.curriculum.order]
    seq_lens = [stage.seq_len for _, stage in stages if not stage.cp_degree]
    pp, dp, cp, _ = check_degrees(par, world, cfg.model, seq_lens)
    for name, stage in stages:
        key = f"curriculum.stages.{name}"
        stage_cp = check_stage_cp_degree(dp * cp, cp, stage.cp_degree, stage.seq_len, key=f"{key}.cp_degree")
        _check(stage_cp == 1 or cfg.model.decoder.aux_loss_coef == 0, "model.decoder.aux_loss_coef",
               cfg.model.decoder.aux_loss_coef, f"0 when a stage uses context parallelism ({name}: cp={stage_cp}); "
               "the sequence-wise balance loss needs whole rows: use the aux-loss-free bias balancing")
        _check(stage.activation_checkpoint in ("", *ACTIVATION_CHECKPOINT_POLICIES), f"{key}.activation_checkpoint",
               stage.activation_checkpoint, f"'' (the run's) or one of {ACTIVATION_CHECKPOINT_POLICIES}")
    _validate_compile(cfg, pp)
    _validate_pipeline(cfg, pp)


# Pipeline schedules that split a block's backward into its input gradients and, later, its weight gradients
# (torch.distributed.pipelining re-walks the autograd graph for each half): a compiled block's backward is one node
# that computes both, so the split double-counts or drops gradients (measured: relative error 1.0).
SPLIT_BACKWARD_SCHEDULES = ("zero_bubble", "interleaved_zero_bubble")


def _validate_compile(cfg: RunConfig, pp_degree: int) -> None:
    """The layouts compiled blocks (``compile``, parallel/compile.py) do not run yet."""
    schedule = cfg.parallel.pp_schedule
    if cfg.compile and pp_degree > 1 and schedule in SPLIT_BACKWARD_SCHEDULES:
        raise ConfigError(f"Invalid layout: compile=true with parallel.pp_schedule={schedule} (pp_degree="
                          f"{pp_degree}) is not supported: zero-bubble schedules split each block's backward into "
                          "input and weight gradients, which a compiled block computes in one step; use "
                          "parallel.pp_schedule=1f1b, interleaved_1f1b or gpipe, or compile=false.")


def check_degrees(par: ParallelConfig, world_size: int, model: ModelArgs | None = None,
                  seq_lens: list[int] | None = None) -> tuple[int, int, int, int]:
    """Check every degree against the world size, the model and the sequence lengths; say what would work.

    Args:
        par: The recipe's degrees (``dp_degree=-1`` takes what ``pp`` and ``cp`` leave).
        world_size: Number of ranks.
        model: The model (expert and layer counts), when known.
        seq_lens: The stages' sequence lengths, when known.

    Returns:
        ``(pp, dp, cp, ep)`` degrees, ``dp`` resolved.
    """
    pp, cp, ep = par.pp_degree, par.cp_degree, par.ep_degree
    for key, value in (("pp_degree", pp), ("cp_degree", cp), ("ep_degree", ep)):
        _check(value >= 1, f"parallel.{key}", value, "an integer >= 1")
    if world_size % (pp * cp):
        raise ConfigError(f"Invalid layout: pp_degree={pp} x cp_degree={cp} does not divide the world size "
                          f"{world_size}; use degrees whose product divides it ({divisors(world_size)}).")
    dp = world_size // (pp * cp) if par.dp_degree == -1 else par.dp_degree
    if pp * dp * cp != world_size:
        raise ConfigError(f"Invalid layout: pp_degree={pp} x dp_degree={dp} x cp_degree={cp} = {pp * dp * cp} "
                          f"ranks, but the world has {world_size}; set parallel.dp_degree="
                          f"{world_size // (pp * cp)} or -1.")
    _check((dp * cp) % ep == 0, "parallel.ep_degree", ep, f"a divisor of dp_degree x cp_degree = {dp * cp} (expert "
           f"parallelism is carved out of them): {divisors(dp * cp)}")
    if model is not None:
        experts, layers = model.decoder.num_routed_experts, model.decoder.num_layers
        _check(experts % ep == 0, "parallel.ep_degree", ep,
               f"a divisor of the {experts} routed experts: {divisors(experts)}")
        _check(layers >= pp, "parallel.pp_degree", pp, f"at most the decoder's {layers} layers")
    for seq_len in seq_lens or []:
        if seq_len % (2 * cp):
            raise ConfigError(f"Invalid layout: sequence length {seq_len} is not divisible by 2 x cp_degree = "
                              f"{2 * cp} (zig-zag context parallelism gives each rank two equal chunks); "
                              f"allowed cp_degree: {divisors(seq_len // 2)}.")
    return pp, dp, cp, ep


def check_stage_cp_degree(ranks: int, run_cp: int, cp_degree: int, seq_len: int, key: str = "cp_degree") -> int:
    """The context-parallel degree of a stage that sets its own (0: the run's ``run_cp``) over the ``ranks`` data x
    context ranks of a pipeline stage, checked against them and the stage's sequence length."""
    cp = cp_degree or run_cp
    if cp < 1 or ranks % cp:
        raise ConfigError(f"Invalid value {key}={cp_degree}: a stage's context parallelism splits the "
                          f"dp_degree x cp_degree = {ranks} ranks; allowed: {divisors(ranks)} (0: the run's).")
    if seq_len % (2 * cp):
        raise ConfigError(f"Invalid value {key}={cp_degree}: sequence length {seq_len} is not divisible by "
                          f"2 x {cp}; allowed: {[c for c in divisors(ranks) if seq_len % (2 * c) == 0]}.")
    return cp


def _validate_pipeline(cfg: RunConfig, pp_degree: int) -> None:
    """What the pipeline does not run (checked whatever ``pp_degree``, so a bad schedule fails early)."""
    par = cfg.parallel
    _check(par.pp_schedule in PIPELINE_SCHEDULES, "parallel.pp_schedule", par.pp_schedule,
           f"one of {sorted(PIPELINE_SCHEDULES)}")
    fixed = PIPELINE_SCHEDULES[par.pp_schedule]
    per_rank = fixed or par.pp_virtual_stages
    _check(fixed is not None or per_rank >= 2, "parallel.pp_virtual_stages", par.pp_virtual_stages,
           f">= 2 (the {par.pp_schedule} schedule interleaves stages)")
    if pp_degree == 1:
        return
    layers = cfg.model.decoder.num_layers
    if pp_degree * per_rank > layers:
        raise ConfigError(f"Invalid layout: pp_degree={pp_degree} x {per_rank} stages per rank "
                          f"({par.pp_schedule}) = {pp_degree * per_rank} stages, but the decoder has {layers} "
                          "layers; use fewer stages or the 1f1b schedule.")
    for name in cfg.curriculum.order:
        micro = cfg.curriculum.stages[name].grad_accum_steps
        rounds = max(1, micro // pp_degree)
        if micro < pp_degree or (per_rank > 1 and micro % rounds):
            raise ConfigError(f"Invalid value curriculum.stages.{name}.grad_accum_steps={micro}: the pipeline "
                              f"needs at least pp_degree={pp_degree} micro-batches per step (and, interleaved, "
                              f"a multiple of {rounds}); use a multiple of {pp_degree}.")
    coca = [n for n in cfg.curriculum.order if cfg.curriculum.stages[n].objective == "coca"]
    if coca:
        raise ConfigError(f"Invalid layout: stages {coca} train the vision tower alone (CoCa objective), which "
                          f"a pipeline cannot split; run them with parallel.pp_degree=1 (here {pp_degree}).")


def divisors(n: int) -> list[int]:
    """The divisors of ``n`` in increasing order (the choices an error message offers)."""
    return [d for d in range(1, n + 1) if n % d == 0]


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


def _check_recovery(cfg: RunConfig) -> None:
    r = cfg.recovery
    for key in ("loss_spike_factor", "grad_spike_factor"):
        value = getattr(r, key)
        _check(value == 0 or value > 1, f"recovery.{key}", value, "0 (off) or a factor > 1")
    _check(r.window >= 1, "recovery.window", r.window, "an integer >= 1 (trained steps the running mean is over)")
    _check(r.max_rollbacks_per_stage >= 0, "recovery.max_rollbacks_per_stage", r.max_rollbacks_per_stage,
           "an integer >= 0")
    _check(r.skip_steps >= 1, "recovery.skip_steps", r.skip_steps, "an integer >= 1 (steps skipped per spike)")
    _check(r.spike_window >= 0, "recovery.spike_window", r.spike_window,
           "an integer >= 0 (steps before a spike whose checkpoints are not trusted)")
    _check(not r.enabled or cfg.checkpoint.keep_last >= 2, "checkpoint.keep_last", cfg.checkpoint.keep_last,
           ">= 2 with spike recovery (a rollback needs a checkpoint from before the spike)")


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"Invalid value {key}={value!r}: allowed is {allowed}.")
