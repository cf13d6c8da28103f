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
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.args import ModelArgs
from model.hf import FORMATS, export_state_dict, hf_config, import_state_dict, load_safetensors, save_safetensors
from model.init import ParamInit
from model.registry import FLAVORS
from model.vlm import KimiVL

__all__ = ["main", "read_our_checkpoint", "write_our_checkpoint"]

MODEL_KEY = "model"  # the state key train/trainer.py saves the model under


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


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and convert one checkpoint; prints a one-line JSON summary."""
    parser = argparse.ArgumentParser(prog="python -m train.hf_convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command, src_help, dst_help in (
        ("import", "HF safetensors file or directory", "our DCP directory (or .pt / .safetensors file)"),
        ("export", "our DCP directory (or .pt / .safetensors file)", "HF safetensors directory"),
    ):
        p = sub.add_parser(command)
        p.add_argument("--format", required=True, choices=sorted(FORMATS))
        p.add_argument("--flavor", required=True, choices=sorted(FLAVORS))
        p.add_argument("src", help=src_help)
        p.add_argument("dst", help=dst_help)
        if command == "import":
            p.add_argument("--seed", type=int, default=0, help="initializes the parts the format does not carry")
        else:
            p.add_argument("--fused-experts", action=argparse.BooleanOptionalAction, default=None,
                           help="transformers' fused gate_up_proj instead of one Linear per expert")
    opts = parser.parse_args(argv)
    args = FLAVORS[opts.flavor]
    if opts.command == "import":
        imported = import_state_dict(load_safetensors(opts.src), opts.format, args)
        state, initialized = complete_state(imported, args, opts.seed)
        write_our_checkpoint(state, opts.dst)
        summary = {"imported": len(imported), "initialized_parts": initialized}
    else:
        exported = export_state_dict(read_our_checkpoint(opts.src), opts.format, args, opts.fused_experts)
        save_safetensors(exported, opts.dst)
        config = hf_config(opts.format, args)
        if config is not None:
            (Path(opts.dst) / "config.json").write_text(json.dumps(config, indent=2))
        summary = {"exported": len(exported), "config": config is not None}
    print(json.dumps({"command": opts.command, "format": opts.format, "flavor": opts.flavor, **summary}))


if __name__ == "__main__":
    main()
