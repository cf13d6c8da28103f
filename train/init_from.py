"""Per-part initialization of a stage: each model part from its own source, read rank-locally.

A stage's ``init_from`` is either one source for the whole model (``previous``, ``scratch``, a checkpoint path) or a
mapping from part to source, as the report starts ``vit_align``::

    init_from: {vision: vit_coca, projector: scratch, decoder: "hf:/ckpts/Moonlight-16B-A3B", coca: drop}

Sources of a part:

* ``scratch``: the run's seeded initialization (model/init.py), redone, so a restarted process gets the same values.
* ``drop``: the part is not carried over (a part the stage does not use, e.g. CoCa after ``vit_coca``); it is
  re-initialized from the seed like ``scratch``.
* ``previous`` or the name of an earlier stage of this run: that stage's final checkpoint.
* a checkpoint written by this framework: a local ``step-XXXXXXXX`` directory or its ``s3://`` URL.
* ``hf:DIR``: a Hugging Face checkpoint directory (format detected from ``config.json`` and the tensor names).

Parts not named start from ``scratch``. Loading happens after ``parallelize``: each rank reads only the tensors of the
parameters it holds (pipeline-pruned layers are absent; of a sharded expert tensor only its own experts: one
``Linear`` per expert file, or rows of a fused tensor), and copies them into its own parameters. No rank builds the
whole model. Names and shapes are checked against the whole model (on ``meta``) before any tensor is read; a
problem names the tensor, the shape expected and the shape found.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.device_mesh import DeviceMesh

from config.hf_config import HF_PREFIX, PARTS_OF_FORMAT, detect_format, read_hf_config
from config.model import ModelArgs
from model.hf import FORMATS
from model.hf_files import SafetensorsCheckpoint
from model.hf_names import Rule, build_rules
from model.init import ParamInit
from model.vlm import KimiVL

__all__ = ["InitError", "check_sources", "load_parts"]

FRESH = ("scratch", "drop")
MODEL_KEY = "model"
_SHOWN = 5


class InitError(ValueError):
    """A stage cannot start from the sources its recipe names (the message names the tensor and the shapes)."""


# --- what this rank holds -------------------------------------------------------------------------------------------


def _held(model: nn.Module, part: str) -> dict[str, torch.Tensor]:
    """This rank's tensors of ``part`` (parameters and persistent buffers) by their full names."""
    module = getattr(model, part, None)
    if module is None:
        return {}
    return {f"{part}.{name}": tensor for name, tensor in module.state_dict(keep_vars=True).items()}


def _expert_slices(model: nn.Module) -> dict[str, slice]:
    """Global expert rows held by each expert-sharded module (``expert_offset``), by the module's name."""
    return {name: slice(module.expert_offset, module.expert_offset + module.w_gate.shape[0])
            for name, module in model.named_modules() if hasattr(module, "expert_offset")}


def _global_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in KimiVL(args).state_dict().items()}


def _listing(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(repr(n) for n in names[:_SHOWN]) + more


# --- our checkpoints ------------------------------------------------------------------------------------------------


def _checkpoint_reader(location: str, s3_options: Any):
    from train.checkpoint_store import METADATA_FILE, split_location

    store, step = split_location(location, s3_options)
    if step not in store.committed_steps():
        raise InitError(f"{location} is not a committed checkpoint (no {METADATA_FILE})")
    return store.reader(step)


def _check_ours(reader, part: str, expected: dict[str, tuple[int, ...]], location: str) -> None:
    entries = reader.read_metadata().state_dict_metadata
    names = [n for n in expected if n.startswith(part + ".")]
    missing = [n for n in names if f"{MODEL_KEY}.{n}" not in entries]
    if missing:
        raise InitError(f"{location} has no {part} tensors {_listing(missing)}: not a checkpoint of this model")
    for name in names:
        meta = entries[f"{MODEL_KEY}.{name}"]
        found = tuple(meta.size) if isinstance(meta, TensorStorageMetadata) else None
        if found != expected[name]:
            raise InitError(f"tensor {name!r} of {location}: expected shape {expected[name]}, found {found}")


def _load_ours(model: nn.Module, part: str, reader, expert_mesh: DeviceMesh | None) -> int:
    """Load ``part`` from one of our checkpoints into this rank's parameters (DCP reads only this rank's shards)."""
    from train.checkpoint import ModelState

    state = {name: t for name, t in ModelState(model, expert_mesh).state_dict().items()
             if name.startswith(part + ".")}
    if not state:
        return 0
    # Without collectives: ranks hold different parts (a pipeline stage may hold none of this one), and each reads
    # only its own tensors and expert shards.
    dcp.load({MODEL_KEY: state}, storage_reader=reader, no_dist=True)
    held = _held(model, part)
    with torch.no_grad():
        for name, loaded in state.items():
            local = loaded.to_local() if hasattr(loaded, "to_local") else loaded
            if local.data_ptr() != held[name].data_ptr():
                held[name].data.copy_(local)
    return len(state)


# --- Hugging Face checkpoints ---------------------------------------------------------------------------------------


def _hf_rules(ckpt: SafetensorsCheckpoint, args: ModelArgs, part: str, source: str) -> list[Rule]:
    directory = Path(source[len(HF_PREFIX):])
    fmt = detect_format(read_hf_config(directory), ckpt.keys())
    if part not in PARTS_OF_FORMAT[fmt]:
        raise InitError(f"{part}: {source} is a {FORMATS[fmt].description}, which holds no {part} "
                        f"(it holds {', '.join(PARTS_OF_FORMAT[fmt])})")
    spec = FORMATS[fmt]
    fused = spec.fused_experts
    if spec.decoder is not None and args.decoder.num_layers > args.decoder.num_dense_layers:
        fused = f"{spec.decoder[0]}layers.{args.decoder.num_dense_layers}.mlp.experts.gate_up_proj" in ckpt
    return [rule for rule in build_rules(fmt, args, fused) if rule.ours[0].startswith(part + ".")]


def _is_position_table(rule: Rule) -> bool:
    return rule.ours == ("vision.pos_table",)  # any square table is resampled to ours


def _check_hf(ckpt: SafetensorsCheckpoint, rules: list[Rule], expected: dict[str, tuple[int, ...]],
              source: str) -> None:
    """Every tensor the rules read exists with the shape our model implies (derived on ``meta``, nothing read)."""
    missing = [name for rule in rules for name in rule.theirs if name not in ckpt]
    if missing:
        raise InitError(f"{source} lacks {len(missing)} tensors the model needs: {_listing(missing)}")
    shapes = ckpt.shapes()
    for rule in rules:
        ours = [torch.empty(expected[name], device="meta") for name in rule.ours]
        wanted = [tuple(t.shape) for t in rule.to_theirs(ours)]
        for name, want in zip(rule.theirs, wanted, strict=True):
            found = shapes[name]
            if _is_position_table(rule):
                if found[-1] != want[-1]:
                    raise InitError(f"tensor {name!r} of {source}: expected width {want[-1]} (shape {want}), "
                                    f"found shape {found}")
            elif found != want:
                raise InitError(f"tensor {name!r} of {source}: expected shape {want}, found {found}")


def _read_rule(ckpt: SafetensorsCheckpoint, rule: Rule, experts: slice | None) -> list[torch.Tensor]:
    """Our tensors of ``rule``, reading only the experts in ``experts`` (None: everything)."""
    if experts is None:
        return rule.to_ours([ckpt.get(name) for name in rule.theirs])
    if len(rule.theirs) == 2:  # fused [E, 2F, H] / [E, H, F]: read this rank's rows only
        return rule.to_ours([ckpt.get_rows(name, experts.start, experts.stop) for name in rule.theirs])
    total = len(rule.theirs) // 3  # one Linear per expert: gate e0..eE-1, up ..., down ...
    return [torch.stack([ckpt.get(rule.theirs[j * total + e]) for e in range(experts.start, experts.stop)])
            for j in range(3)]


def _load_hf(model: nn.Module, part: str, ckpt: SafetensorsCheckpoint, rules: list[Rule]) -> int:
    held = _held(model, part)
    slices = _expert_slices(model)
    count = 0
    with torch.no_grad():
        for rule in rules:
            targets = [held.get(name) for name in rule.ours]
            if all(t is None for t in targets):
                continue  # another pipeline stage's layer
            module = rule.ours[0].rpartition(".")[0]
            experts = slices.get(module) if rule.ours[0].endswith("w_gate") else None
            for target, tensor in zip(targets, _read_rule(ckpt, rule, experts), strict=True):
                if target is not None:
                    target.data.copy_(tensor)
                    count += 1
    return count


# --- the stage's start ------------------------------------------------------------------------------------------------


def _reinit(model: nn.Module, part: str, seed: int, std: float) -> None:
    module = getattr(model, part, None)
    if module is None:
        return
    init = ParamInit(seed).child(part)
    if part == "decoder":
        module.init_weights(init)
    else:
        module.init_weights(init, std)


def _resolve(source: str, earlier: list[str], locate) -> str:
    """A stage source (``previous`` or a stage name) as its final checkpoint's location; other sources as given."""
    if source == "previous":
        source = earlier[-1]
    if source in earlier:
        return locate(source)
    return source


def _groups(sources: dict[str, str]) -> Iterator[tuple[str, list[str]]]:
    by_source: dict[str, list[str]] = {}
    for part, source in sources.items():
        by_source.setdefault(source, []).append(part)
    yield from by_source.items()


def check_sources(args: ModelArgs, sources: dict[str, str], stage_names: list[str], s3_options: Any = None) -> None:
    """Check the ``hf:`` and checkpoint-path sources of a stage against the model, reading headers only (sources
    that are stages of this run do not exist yet). Run before any stage trains."""
    expected = _global_shapes(args)
    for source, parts in _groups(sources):
        for part in parts:
            if source in FRESH or source == "previous" or source in stage_names:
                continue
            if source.startswith(HF_PREFIX):
                ckpt = SafetensorsCheckpoint(source[len(HF_PREFIX):])
                _check_hf(ckpt, _hf_rules(ckpt, args, part, source), expected, source)
            else:
                _check_ours(_checkpoint_reader(source, s3_options), part, expected, source)


def load_parts(model: nn.Module, args: ModelArgs, sources: dict[str, str], earlier: list[str], locate, seed: int,
               expert_mesh: DeviceMesh | None = None, s3_options: Any = None) -> dict[str, str]:
    """Initialize each part of this rank's ``model`` from its source; returns ``{part: where from}``.

    Args:
        model: This rank's model after ``parallelize`` (possibly pruned, experts possibly sharded).
        args: The whole model's hyper-parameters (the shapes checked against).
        sources: ``{part: source}`` from :func:`parse_init_from`.
        earlier: The stages before this one.
        locate: ``stage name -> location of its final checkpoint`` (raises if it has none).
        seed: The run's seed (``scratch`` / ``drop``).
        expert_mesh: The mesh of expert-parallel shards, if experts are sharded.
        s3_options: Options of ``s3://`` checkpoint locations.
    """
    expected = _global_shapes(args)
    done: dict[str, str] = {}
    for part, source in sources.items():
        if source in FRESH:
            _reinit(model, part, seed, args.decoder.init_std)
            done[part] = source
            continue
        location = _resolve(source, earlier, locate)
        if location.startswith(HF_PREFIX):
            ckpt = SafetensorsCheckpoint(location[len(HF_PREFIX):])
            rules = _hf_rules(ckpt, args, part, location)
            _check_hf(ckpt, rules, expected, location)
            _load_hf(model, part, ckpt, rules)
        else:
            reader = _checkpoint_reader(location, s3_options)
            _check_ours(reader, part, expected, location)
            _load_ours(model, part, reader, expert_mesh)
        done[part] = location
    return done
