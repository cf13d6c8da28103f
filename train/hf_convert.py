"""``python -m train.hf_convert {import,export}``: convert checkpoint directories between our format and Hugging Face's.

Our side is a ``torch.distributed.checkpoint`` directory with the model state under ``model.`` (the layout
``train/checkpoint.py`` writes and ``load_checkpoint(path, {"model": ModelState(model)})`` reads), or a plain state
dict file (``.pt`` / ``.safetensors``). Their side is a directory of safetensors shards.

The name and layout mappings live in ``model/hf.py`` (pure tensor work); this CLI is in ``train/`` because it reads
and writes ``torch.distributed.checkpoint`` directories, which ``model/`` never touches.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from config.hf_config import args_from_hf, detect_format, read_hf_config
from config.model import ModelArgs
from model.hf import FORMATS, export_state_dict, hf_config, import_state_dict, load_safetensors, save_safetensors
from model.hf_files import SafetensorsCheckpoint
from model.init import ParamInit
from model.registry import FLAVORS
from model.vlm import KimiVL

__all__ = ["main", "read_our_checkpoint", "with_master_weights", "write_our_checkpoint"]

MODEL_KEY = "model"  # the state key the trainer saves the model under (train/builders.py: checkpoint_state)


def read_our_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Our model state from a DCP directory (only the ``model.*`` entries are read) or a plain state dict file."""
    path = Path(path)
    if path.is_dir():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        reader = dcp.FileSystemReader(path)
        entries = reader.read_metadata().state_dict_metadata
        prefix = MODEL_KEY + "."
        template = {name.removeprefix(prefix): torch.empty(meta.size, dtype=meta.properties.dtype)
                    for name, meta in entries.items()
                    if name.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}
        if not template:
            raise ValueError(f"{path} holds no '{MODEL_KEY}.*' tensors: not a checkpoint written by train/.")
        dcp.load({MODEL_KEY: template}, storage_reader=reader)
        return template
    state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu",
                                                                              weights_only=True)
    if all(name.startswith(MODEL_KEY + ".") for name in state):  # a flattened DCP-style dict
        state = {name.removeprefix(MODEL_KEY + "."): t for name, t in state.items()}
    return state


def with_master_weights(path: str | Path, args: ModelArgs, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (a checkpoint's model entries) with every parameter the optimizer held taken from its fp32 master
    weights (``optim.<piece>.master``): a bf16 run's exact values, not their bf16 rounding. Parameters the stage did
    not train keep the model entry's values, upcast to fp32; a checkpoint without masters is returned as it is."""
    import torch.distributed.checkpoint as dcp

    from optim.plan import build_units, build_units_all_adamw, pieces_of

    reader = dcp.FileSystemReader(path)
    saved = {name.removeprefix("optim.").removesuffix(".master"): meta.size
             for name, meta in reader.read_metadata().state_dict_metadata.items()
             if name.startswith("optim.") and name.endswith(".master")}
    if not saved:
        return state
    with torch.device("meta"):
        model = KimiVL(args)
    # The pieces the optimizer that wrote them cut (Muon matrices and AdamW chunks, or AdamW chunks only).
    for units in (build_units(model), build_units_all_adamw(model)):
        pieces = {piece.key: piece for unit in units for piece in pieces_of(unit)}
        if saved.keys() <= pieces.keys():
            break
    else:
        unknown = sorted(saved.keys() - pieces.keys())[:3]
        raise ValueError(f"{path}: master weights {unknown} match no parameter of the {args.flavor} model")
    masters = {key: torch.empty(size, dtype=torch.float32) for key, size in saved.items()}
    dcp.load({"optim": {key: {"master": tensor} for key, tensor in masters.items()}}, storage_reader=reader)
    state = {name: tensor.float() for name, tensor in state.items()}
    for key, values in masters.items():
        piece = pieces[key]
        piece.view(state[piece.unit.route.name]).copy_(values)
    return state


def write_our_checkpoint(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write our model state as a DCP directory (``.pt`` / ``.safetensors`` paths: a plain state dict file)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        save_file({name: t.contiguous() for name, t in state.items()}, path)
    elif path.suffix == ".pt":
        torch.save(state, path)
    else:
        import torch.distributed.checkpoint as dcp

        dcp.save({MODEL_KEY: state}, storage_writer=dcp.FileSystemWriter(path))


def complete_state(imported: dict[str, torch.Tensor], args: ModelArgs, seed: int) -> tuple[dict, list[str]]:
    """Add freshly initialized tensors for every top-level part the import did not cover (always CoCa).

    Only the uncovered parts are materialized, so importing the 16B flavor does not hold the decoder twice.

    Returns:
        ``(full state dict, names of the initialized parts)``.
    """
    with torch.device("meta"):
        model = KimiVL(args)
    init = ParamInit(seed)
    state = dict(imported)
    initialized = []
    std = args.decoder.init_std
    for name, part in model.named_children():
        names = [f"{name}.{key}" for key in part.state_dict()]
        if all(key in imported for key in names):
            continue
        part.to_empty(device="cpu")
        if name == "decoder":
            part.init_weights(init.child(name))
        else:
            part.init_weights(init.child(name), std)
        for key, tensor in part.state_dict().items():
            state.setdefault(f"{name}.{key}", tensor)
        initialized.append(name)
    return state, initialized


def resolve_import(src: str | Path, fmt: str | None, flavor: str | None) -> tuple[str, ModelArgs]:
    """The format and model hyper-parameters of an HF checkpoint directory: from its ``config.json`` and tensor
    names unless given (``flavor`` then fixes the shapes the import checks against)."""
    src = Path(src)
    config = read_hf_config(src) if src.is_dir() and (src / "config.json").exists() else None
    if fmt is None:
        if config is None:
            raise ValueError(f"{src} has no config.json: give --format")
        fmt = detect_format(config, SafetensorsCheckpoint(src).keys())
    if flavor is not None:
        return fmt, FLAVORS[flavor]
    if config is None:
        raise ValueError(f"{src} has no config.json: give --flavor")
    return fmt, args_from_hf(config, FLAVORS["kimi_vl_a3b"])


def _token_ids(opts: argparse.Namespace) -> dict[str, int | None]:
    ids = {"image_token_id": opts.image_token_id, "video_token_id": opts.video_token_id}
    if opts.tokenizer:
        from data.tokenizer import TextTokenizer

        tokenizer = TextTokenizer.from_file(opts.tokenizer)
        ids.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        ids["image_token_id"] = ids["image_token_id"] if ids["image_token_id"] is not None else tokenizer.image_id
    return ids


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.hf_convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("import", help="HF safetensors (directory with config.json, or file) -> our checkpoint")
    p.add_argument("--hf", help="HF checkpoint directory (format and sizes read from its config.json)")
    p.add_argument("--out", help="our DCP directory (or .pt / .safetensors file)")
    p.add_argument("--format", choices=sorted(FORMATS), help="default: detected from config.json and tensor names")
    p.add_argument("--flavor", choices=sorted(FLAVORS), help="default: the sizes config.json gives")
    p.add_argument("--seed", type=int, default=0, help="initializes the parts the format does not carry")
    p.add_argument("src", nargs="?", help="(positional form of --hf)")
    p.add_argument("dst", nargs="?", help="(positional form of --out)")
    p = sub.add_parser("export", help="our checkpoint -> HF safetensors + a complete config.json")
    p.add_argument("--format", required=True, choices=sorted(FORMATS))
    p.add_argument("--flavor", required=True, choices=sorted(FLAVORS))
    p.add_argument("--fused-experts", action=argparse.BooleanOptionalAction, default=None,
                   help="transformers' fused gate_up_proj instead of one Linear per expert")
    p.add_argument("--tokenizer", help="tokenizer.json whose special tokens give config.json its token ids")
    p.add_argument("--image-token-id", type=int, help="the image placeholder id (default: the tokenizer's)")
    p.add_argument("--video-token-id", type=int, help="the video placeholder id (default: the image one)")
    p.add_argument("src", help="our DCP directory (or .pt / .safetensors file)")
    p.add_argument("dst", help="HF safetensors directory")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and convert one checkpoint; prints a one-line JSON summary. A checkpoint or config
    that cannot be converted exits with status 2 and one line saying why."""
    parser = _parser()
    opts = parser.parse_args(argv)
    try:
        _convert(parser, opts)
    except (ValueError, FileNotFoundError, KeyError) as error:
        if argv is not None:  # called from Python: the caller handles it
            raise
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _convert(parser: argparse.ArgumentParser, opts: argparse.Namespace) -> None:
    if opts.command == "import":
        src, dst = opts.hf or opts.src, opts.out or opts.dst
        if not src or not dst:
            parser.error("import needs --hf DIR and --out CKPT")
        fmt, args = resolve_import(src, opts.format, opts.flavor)
        imported = import_state_dict(load_safetensors(src), fmt, args)
        # With a flavor the checkpoint is a whole model (the parts the format lacks initialized from --seed);
        # without one it holds exactly the parts the HF directory holds, for a per-part ``init_from``.
        state, initialized = complete_state(imported, args, opts.seed) if opts.flavor else (imported, [])
        write_our_checkpoint(state, dst)
        summary = {"format": fmt, "flavor": args.flavor, "imported": len(imported), "initialized_parts": initialized}
    else:
        args = FLAVORS[opts.flavor]
        state = read_our_checkpoint(opts.src)
        if Path(opts.src).is_dir():  # the fp32 master weights, where the optimizer held them
            state = with_master_weights(opts.src, args, state)
        exported = export_state_dict(state, opts.format, args, opts.fused_experts)
        save_safetensors(exported, opts.dst)
        config = hf_config(opts.format, args, **_token_ids(opts))
        (Path(opts.dst) / "config.json").write_text(json.dumps(config, indent=2))
        summary = {"format": opts.format, "flavor": opts.flavor, "exported": len(exported)}
    print(json.dumps({"command": opts.command, **summary}))


if __name__ == "__main__":
    main()
