"""``python -m train.eval CHECKPOINT [options]``: evaluate any checkpoint the trainer wrote; writes a JSON report.

Tasks (``--tasks``, default ``auto``: retrieval for a ``coca`` stage, held-out loss and needle in a haystack for the
others):

- ``heldout_loss``: next-token loss of the VLM per data category (every source of the evaluation root's manifest),
  rendered and packed exactly as in training, summed over supervised tokens and divided by their count.
- ``retrieval``: zero-shot image->text and text->image recall@1/@5 with the CoCa towers on caption samples.
- ``niah``: needle in a haystack (:mod:`train.eval_niah`), recall per length bucket up to the stage's context.

``CHECKPOINT`` is a ``step-XXXXXXXX`` directory or S3 URL, or a stage / run directory or a stage's S3 prefix (its
latest committed checkpoint). The model flavor, stage (sequence length, RoPE base, patch cap) and data root come
from the ``checkpoint.json`` the checkpoint carries (for checkpoints older than it: the run's ``config.yaml``); the
tokenizer from the data root's manifest. Samples come from ``--eval-root`` (default: the data root): from each
source's held-out split when its manifest has one (``python -m data.prepare --heldout-fraction``; the demo corpus
has one), else from a separately generated root (``python -m data.synthetic --seed 1 --scale 0.1 --out DIR``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from config import RunConfig, StageConfig, to_run_config
from data.loader import read_manifest
from data.packing import collate_image_text
from data.samples import SampleError, caption_text, render_document
from data.tokenizer import TextTokenizer, load_root_tokenizer
from model.registry import build_model
from storage import S3Options, open_storage
from train.checkpoint import ModelState, load_checkpoint, read_checkpoint_info
from train.checkpoint_store import STEP_DIR, S3CheckpointStore
from train.eval_data import HeldOutData, batch_loss_sum, pack_documents
from train.eval_niah import HAYSTACKS, MODES, NeedleBench, length_buckets
from train.metrics import write_atomic

logger = logging.getLogger(__name__)
TASKS = ("heldout_loss", "retrieval", "niah")


class EvalError(ValueError):
    """The checkpoint, its configuration or an option cannot be evaluated; the message says what to change."""


def resolve_checkpoint(path: str | Path, options: S3Options | None = None) -> str:
    """The committed checkpoint ``path`` names: itself, or the latest ``step-*`` below a stage's ``checkpoints``
    directory, a stage directory, or a run directory (its last stage with checkpoints); on S3 a checkpoint's URL or
    the URL of a stage's checkpoints (its latest)."""
    text = str(path).rstrip("/")
    if text.startswith("s3://"):
        if STEP_DIR.match(text.rpartition("/")[2]):
            return text
        store = S3CheckpointStore(text, options)
        steps = store.committed_steps()
        if not steps:
            raise EvalError(f"no committed checkpoint (a step-XXXXXXXX/ with .metadata) under {text}")
        return store.location(steps[-1])
    path = Path(text)
    if (path / ".metadata").exists():
        return str(path)
    candidates = [p for p in path.glob("checkpoints/step-*") if STEP_DIR.match(p.name)]
    candidates += [p for p in path.glob("step-*") if STEP_DIR.match(p.name)]
    if not candidates:  # a run directory: the newest checkpoint of any stage
        candidates = [p for p in path.glob("*/checkpoints/step-*") if STEP_DIR.match(p.name)]
        candidates.sort(key=lambda p: p.stat().st_mtime)
        candidates = candidates[-1:]
    committed = sorted(p for p in candidates if (p / ".metadata").exists())
    if not committed:
        raise EvalError(f"no committed checkpoint (a step-XXXXXXXX directory with .metadata) at or below {path}")
    return str(committed[-1])


def load_run_config(checkpoint: str, config_path: str | Path | None = None, info: dict | None = None) -> RunConfig:
    """The run's configuration: ``--config``, else the one the checkpoint carries (``checkpoint.json``), else
    ``config.yaml`` of the run directory (``<run>/<stage>/checkpoints/step-*``)."""
    if config_path is None and info and "config" in info:
        return to_run_config(OmegaConf.create(info["config"]))
    path = Path(config_path) if config_path else Path(checkpoint).parents[2] / "config.yaml"
    if not path.exists():
        raise EvalError(f"no run configuration at {path}: pass --config <run>/config.yaml of the run that wrote "
                        f"{checkpoint}")
    return to_run_config(OmegaConf.load(path))


def stage_of(cfg: RunConfig, checkpoint: str, name: str | None = None, info: dict | None = None
             ) -> tuple[str, StageConfig]:
    """The stage the checkpoint belongs to: ``name``, else the one it carries, else its directory's."""
    name = name or (info or {}).get("stage") or Path(checkpoint).parents[1].name
    if name not in cfg.curriculum.stages:
        raise EvalError(f"stage '{name}' is not in the run's curriculum ({', '.join(cfg.curriculum.stages)}): "
                        "pass --stage")
    return name, cfg.curriculum.stages[name]


def load_model(cfg: RunConfig, checkpoint: str, rope_theta: float, options: S3Options | None = None) -> nn.Module:
    """The whole model with the checkpoint's weights and RoPE base, in eval mode."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    load_checkpoint(checkpoint, {"model": ModelState(model)}, options)
    model.set_rope_theta(rope_theta)
    return model.eval()


def load_tokenizer(cfg: RunConfig, root: str) -> TextTokenizer:
    storage = open_storage(root)
    return load_root_tokenizer(storage, read_manifest(storage))


@torch.no_grad()
def heldout_loss(model: nn.Module, data: HeldOutData, tokenizer: TextTokenizer, seq_len: int, per_source: int,
                 sources: list[str] | None = None) -> dict:
    """Next-token loss per source on ``per_source`` samples each (documents cut to ``seq_len`` tokens).

    Returns:
        ``{source: {"loss", "perplexity", "tokens", "samples"}}`` and ``"all"`` (token-weighted over sources).
    """
    vision = model.args.vision
    report, total_ce, total_tokens = {}, 0.0, 0
    for name in sources or data.source_names:
        docs = []
        for sample in data.samples(name, per_source):
            try:
                docs.append(render_document(sample.meta, sample.images, tokenizer, vision.merge_size, seq_len))
            except SampleError:
                continue
        ce, tokens = 0.0, 0
        for batch in pack_documents(docs, seq_len, tokenizer, vision):
            batch_ce, batch_tokens = batch_loss_sum(model, batch)
            ce, tokens = ce + batch_ce, tokens + batch_tokens
        if tokens == 0:
            continue
        report[name] = {"loss": ce / tokens, "perplexity": math.exp(min(ce / tokens, 50.0)), "tokens": tokens,
                        "samples": len(docs)}
        total_ce, total_tokens = total_ce + ce, total_tokens + tokens
    if not total_tokens:
        raise EvalError(f"no source of {data.storage.url} yielded a supervised token")
    report["all"] = {"loss": total_ce / total_tokens, "tokens": total_tokens}
    return report


def retrieval_recall(similarity: torch.Tensor, keys: list[str], ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Image->text and text->image recall@k of an ``[images, texts]`` similarity matrix of paired samples.

    Sample ``i``'s image and text are a pair. Identical texts (``keys``) describe their images equally well, so a
    retrieved item counts as correct when its text equals the query's (without this, duplicated captions would make
    perfect embeddings score below 1).
    """
    n = similarity.shape[0]
    same = torch.tensor([[a == b for b in keys] for a in keys])
    out = {}
    for k in ks:
        top_texts = similarity.topk(min(k, n), dim=1).indices  # per image
        top_images = similarity.t().topk(min(k, n), dim=1).indices  # per text
        rows = torch.arange(n).view(-1, 1)
        out[f"image_to_text_r@{k}"] = float(same[rows, top_texts].any(1).float().mean())
        out[f"text_to_image_r@{k}"] = float(same[rows, top_images].any(1).float().mean())
    return out


@torch.no_grad()
def retrieval(model: nn.Module, data: HeldOutData, tokenizer: TextTokenizer, count: int, max_text_len: int,
              batch_size: int = 32, source: str = "caption") -> dict:
    """Zero-shot retrieval with the CoCa towers among ``count`` image-caption pairs of ``source``."""
    pairs, keys = [], []
    for sample in data.samples(source, count):
        if not sample.images:
            continue
        first = next(s["image"] for s in sample.meta["segments"] if "image" in s)
        text = caption_text(sample.meta)
        ids = tokenizer.encode(text)[: min(max_text_len, model.args.coca.text_max_len) - 2]
        pairs.append((sample.images[first], [tokenizer.bos_id, *ids, tokenizer.eos_id]))
        keys.append(text)
    if len(pairs) < 2:
        raise EvalError(f"source '{source}' of {data.storage.url} has fewer than 2 image-text pairs")
    images, texts = [], []
    for start in range(0, len(pairs), batch_size):
        batch = collate_image_text(pairs[start: start + batch_size], tokenizer.pad_id)
        out = model.forward_coca(batch.pixel_values, batch.image_grid_hw, batch.text_ids, batch.text_mask)
        images.append(out.image_embeds)
        texts.append(out.text_embeds)
    similarity = torch.cat(images) @ torch.cat(texts).t()
    return {"source": source, "samples": len(pairs), "distinct_texts": len(set(keys)),
            **retrieval_recall(similarity, keys)}


def evaluate(checkpoint: str | Path, tasks: list[str] | None = None, config: str | None = None,
             stage_name: str | None = None, data_root: str | None = None, eval_root: str | None = None,
             samples_per_source: int = 16, retrieval_samples: int = 64, niah_trials: int = 5,
             niah_mode: str = "choice", niah_haystacks: list[str] | None = None, context: int = 0,
             seed: int = 0, endpoint_url: str = "") -> dict:
    """Run the tasks on one checkpoint; returns the report (see the module docstring and the README)."""
    started = time.perf_counter()
    options = S3Options(endpoint_url=endpoint_url)
    path = resolve_checkpoint(checkpoint, options)
    info = read_checkpoint_info(path, options)
    cfg = load_run_config(path, config, info)
    name, stage = stage_of(cfg, path, stage_name, info)
    # The RoPE base the checkpoint was trained with (the stage's, unless --stage names another).
    rope_theta = info["rope_theta"] if info.get("stage") == name and "rope_theta" in info else stage.rope_theta
    if not tasks or tasks == ["auto"]:
        tasks = ["retrieval"] if stage.objective == "coca" else ["heldout_loss", "niah"]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise EvalError(f"unknown tasks {unknown}: allowed are {', '.join(TASKS)} (or auto)")
    data_root = data_root or cfg.data.root
    eval_root = eval_root or data_root
    tokenizer = load_tokenizer(cfg, data_root)
    model = load_model(cfg, path, rope_theta, options)
    # A root other than the training root is held out as a whole: all of its samples are used.
    data = HeldOutData(open_storage(eval_root), cfg.model.vision, stage.max_image_patches,
                       use_heldout_split=str(eval_root) == str(data_root))
    context = context or stage.seq_len
    report = {"checkpoint": str(path), "stage": name, "objective": stage.objective, "flavor": cfg.model.flavor,
              "step": info.get("step"), "context": context, "rope_theta": rope_theta, "data_root": str(data_root),
              "eval_root": str(eval_root), "eval_root_is_training_root": str(eval_root) == str(data_root),
              # Sources evaluated on their manifest's held-out split (the others: the tail of their shards).
              "heldout_split_sources": [n for n in data.source_names if data.has_heldout_split(n)],
              "tasks": {}}
    if "heldout_loss" in tasks:
        report["tasks"]["heldout_loss"] = heldout_loss(model, data, tokenizer, context, samples_per_source)
    if "retrieval" in tasks:
        report["tasks"]["retrieval"] = retrieval(model, data, tokenizer, retrieval_samples, stage.max_text_len)
    if "niah" in tasks:
        bench = NeedleBench(data, tokenizer, cfg.model.vision, seed)
        buckets = length_buckets(context)
        with torch.no_grad():
            report["tasks"]["niah"] = {
                "buckets": [f"({lo}, {hi}]" for lo, hi in buckets],
                **{kind: bench.run(model, kind, buckets, niah_trials, niah_mode)
                   for kind in niah_haystacks or HAYSTACKS}}
    report["seconds"] = time.perf_counter() - started
    return report


def summary_lines(report: dict) -> list[str]:
    """A few human-readable lines of a report."""
    tasks = report["tasks"]
    lines = [f"{report['checkpoint']} ({report['stage']}, context {report['context']})"]
    if "heldout_loss" in tasks:
        lines.append("held-out loss: " + "  ".join(f"{k} {v['loss']:.3f}" for k, v in tasks["heldout_loss"].items()))
    if "retrieval" in tasks:
        r = tasks["retrieval"]
        lines.append(f"retrieval ({r['samples']} pairs): " + "  ".join(
            f"{k} {v:.3f}" for k, v in r.items() if "r@" in k))
    for kind in HAYSTACKS:
        if kind in tasks.get("niah", {}):
            result = tasks["niah"][kind]
            recalls = ["-" if r is None else f"{r:.2f}" for r in result["buckets"].values()]
            lines.append(f"niah {kind} ({result['mode']}, chance {result['chance']:.2f}): " + "  ".join(
                f"{bucket} {recall}" for bucket, recall in zip(result["buckets"], recalls)))
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.eval", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="step-XXXXXXXX directory or S3 URL, or a stage / run directory or the S3 "
                        "URL of a stage's checkpoints (latest)")
    parser.add_argument("--tasks", default="auto", help=f"comma-separated among {', '.join(TASKS)}, or auto")
    parser.add_argument("--out", help="report path (default: <stage>/eval/<step>.json next to the checkpoints)")
    parser.add_argument("--config", help="the run's config.yaml (default: found from the checkpoint's path)")
    parser.add_argument("--stage", help="stage name (default: from the checkpoint's path)")
    parser.add_argument("--data-root", help="root whose manifest gives the tokenizer (default: the run's)")
    parser.add_argument("--eval-root", help="root of the evaluation samples (default: the data root)")
    parser.add_argument("--samples-per-source", type=int, default=16)
    parser.add_argument("--retrieval-samples", type=int, default=64)
    parser.add_argument("--niah-trials", type=int, default=5, help="prompts per bucket and haystack")
    parser.add_argument("--niah-mode", default="choice", choices=MODES)
    parser.add_argument("--niah-haystacks", default=",".join(HAYSTACKS))
    parser.add_argument("--context", type=int, default=0, help="longest prompt (default: the stage's seq_len)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--endpoint-url", default="", help="S3 endpoint of a non-AWS server (checkpoints on S3)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        report = evaluate(args.checkpoint, args.tasks.split(","), args.config, args.stage, args.data_root,
                          args.eval_root, args.samples_per_source, args.retrieval_samples, args.niah_trials,
                          args.niah_mode, args.niah_haystacks.split(","), args.context, args.seed,
                          args.endpoint_url)
    except (EvalError, FileNotFoundError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    checkpoint = report["checkpoint"]
    step_name = checkpoint.rpartition("/")[2]
    if args.out:
        out = Path(args.out)
    elif checkpoint.startswith("s3://"):  # next to nothing local: the working directory
        out = Path("eval") / report["stage"] / f"{step_name}.json"
    else:
        out = Path(checkpoint).parents[1] / "eval" / f"{step_name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(report, indent=2) + "\n")
    print("\n".join(summary_lines(report)))
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
