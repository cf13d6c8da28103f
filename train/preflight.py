"""Every data check of a run, for every stage, before the first one trains (and before any process group exists).

:func:`check_run` reads the root's manifest once and checks what each stage of the curriculum will need: the root
exists and holds a manifest (the demo corpus is made by an explicit step, ``python -m data.synthetic --out
demo_data``, never by a run), the sources of every mixture (``data.missing_sources``:
``error`` lists them all, ``drop`` renormalizes each mixture over the sources the root has), the tokenizer against
the model's vocabulary, every shard present, and the largest image at each stage's patch cap against its sequence
length. Failures raise :class:`~config.ConfigError` or :class:`~data.loader.DataError` with one message
saying what to change; ``python -m train`` prints it as one line (exit 2).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from config import ConfigError, DataConfig, MixtureConfig, RunConfig
from data.images import fit_grid
from data.loader import DataError
from data.mixture import MixtureSampler
from data.shards import source_files
from data.tokenizer import TextTokenizer, load_root_tokenizer
from storage import LocalStorage, Storage, build_storage

logger = logging.getLogger(__name__)
# The default data.root, where `python -m data.synthetic` writes the demo corpus.
DEMO_ROOT = DataConfig().root
GROUPS = ("multimodal_sources", "text_sources", "long_sources")


def is_demo_root(root: str) -> bool:
    """Whether ``root`` is the default demo path (relative to the working directory, however it is spelt)."""
    text = root[len("file://"):] if root.startswith("file://") else root
    return "://" not in text and Path(text).resolve() == Path(DEMO_ROOT).resolve()


def check_run(cfg: RunConfig) -> None:
    """Check the data of every stage of ``cfg``'s curriculum (see the module docstring); with
    ``data.missing_sources=drop``, the stages' mixtures are changed in place to the sources the root has.

    Raises:
        DataError: The root, its manifest, tokenizer or shards are missing, or the stages' sources are.
        ConfigError: The data does not fit the model or a stage (vocabulary, images against patch caps).
    """
    storage = build_storage(cfg.data)
    manifest = read_root_manifest(cfg.data, storage)
    _resolve_sources(cfg, manifest, storage.url)
    load_checked_tokenizer(cfg, manifest, storage)
    used = sorted({name for stage in _stages(cfg) for name in _sampler(stage).sources()})
    if not cfg.data.skip_missing_shards:
        _check_shards(storage, manifest, used)
    _check_image_caps(cfg, manifest)


def read_root_manifest(data: DataConfig, storage: Storage) -> dict:
    """The data root's ``manifest.json``, or a :class:`DataError` saying how to make one (the demo corpus at the
    default root: ``python -m data.synthetic``)."""
    if storage.exists("manifest.json"):
        return json.loads(storage.read("manifest.json"))
    where = f"data.root={data.root}"
    local = isinstance(storage, LocalStorage)
    if local and is_demo_root(data.root):
        raise DataError(f"{where}: the demo corpus is not generated yet; generate it first with python -m "
                        f"data.synthetic --out {DEMO_ROOT}")
    if local and not Path(storage.root).exists():
        raise DataError(f"{where}: no such folder ({Path(storage.root).resolve()}); point data.root at a root made "
                        "by python -m data.prepare, or generate the demo corpus there with python -m data.synthetic "
                        f"--out {data.root}")
    raise DataError(f"{where}: no manifest.json at {storage.url}; prepare a source into it with python -m "
                    "data.prepare --input ... --source NAME --out ROOT")


def _stages(cfg: RunConfig):
    return [cfg.curriculum.stages[name] for name in cfg.curriculum.order]


def _sampler(stage) -> MixtureSampler:
    return MixtureSampler(stage.mixture, 0, "", images_only=stage.objective == "coca")


def _resolve_sources(cfg: RunConfig, manifest: dict, url: str) -> None:
    """``error``: every stage's sources the root lacks, in one message; ``drop``: mixtures without them."""
    have = set(manifest.get("sources", {}))
    lacking = {name: [s for s in _sampler(cfg.curriculum.stages[name]).sources() if s not in have]
               for name in cfg.curriculum.order}
    lacking = {name: missing for name, missing in lacking.items() if missing}
    if not lacking:
        return
    if cfg.data.missing_sources == "error":
        listed = "; ".join(f"{name}: {', '.join(missing)}" for name, missing in lacking.items())
        raise DataError(f"{url} lacks sources the curriculum mixes ({listed}); it has: {', '.join(sorted(have))}. "
                        "Set data.missing_sources=drop to train each stage on the sources it has, or name the "
                        "mixture, e.g. curriculum.stages.<stage>.mixture.multimodal_sources={<source>: 1.0}")
    for name in lacking:
        stage = cfg.curriculum.stages[name]
        stage.mixture = _dropped(stage.mixture, have, name, stage.objective)
        logger.info("stage %s: mixture over the sources %s has: %s", name, url, _describe(stage.mixture))


def _dropped(mix: MixtureConfig, have: set[str], stage: str, objective: str) -> MixtureConfig:
    """The mixture without the sources the root lacks; a group left empty gets no share."""
    groups = {group: {s: w for s, w in getattr(mix, group).items() if s in have and w > 0} for group in GROUPS}
    multimodal, text, long = (bool(groups[g]) for g in GROUPS)
    start, end = mix.multimodal_share_start, mix.multimodal_share_end
    if objective == "coca" and not multimodal:
        raise DataError(f"stage {stage}: no image-text source left after data.missing_sources=drop (the CoCa "
                        f"objective needs images); it wanted {', '.join(mix.multimodal_sources)}")
    if not multimodal:
        start = end = 0.0
    if not text and objective != "coca":
        start = end = 1.0 if multimodal else 0.0
    if not multimodal and not text and not long:
        raise DataError(f"stage {stage}: no source left after data.missing_sources=drop; it wanted "
                        f"{', '.join(sorted({s for g in GROUPS for s in getattr(mix, g)}))}")
    long_share = mix.long_share if long else 0.0
    if long and not multimodal and not text:
        long_share = 1.0
    return MixtureConfig(text_sources=groups["text_sources"], multimodal_sources=groups["multimodal_sources"],
                         multimodal_share_start=start, multimodal_share_end=end, long_sources=groups["long_sources"],
                         long_share=long_share)


def _describe(mix: MixtureConfig) -> str:
    def weights(group: dict[str, float]) -> str:
        total = sum(group.values())
        return ", ".join(f"{s} {w / total:.2f}" for s, w in group.items()) or "-"

    return (f"multimodal [{weights(mix.multimodal_sources)}] share {mix.multimodal_share_start:g}->"
            f"{mix.multimodal_share_end:g}; text [{weights(mix.text_sources)}]; long [{weights(mix.long_sources)}] "
            f"share {mix.long_share:g}")


def load_checked_tokenizer(cfg: RunConfig, manifest: dict, storage: Storage) -> TextTokenizer:
    """The tokenizer the root's ``manifest`` names, checked against the model's vocabulary.

    Raises:
        DataError: The root has no tokenizer, or one that cannot be loaded.
        ConfigError: The tokenizer has more tokens than ``model.decoder.vocab_size``.
    """
    name = manifest.get("tokenizer")
    if not name or not storage.exists(name):
        raise DataError(f"{storage.url} has no tokenizer: train one on its sources with python -m data.tokenizer "
                        f"train {cfg.data.root}")
    try:
        tokenizer = load_root_tokenizer(storage, manifest)
    except ValueError as error:
        raise DataError(f"{storage.url}: {error}") from None
    vocab = cfg.model.decoder.vocab_size
    if tokenizer.vocab_size > vocab:
        raise ConfigError(f"Invalid value model.decoder.vocab_size={vocab}: the tokenizer of {cfg.data.root} has "
                          f"{tokenizer.vocab_size} tokens; allowed is >= {tokenizer.vocab_size}.")
    return tokenizer


def _check_shards(storage: Storage, manifest: dict, used: list[str]) -> None:
    """Every shard of the sources the curriculum reads exists (one listing per source folder)."""
    missing = []
    for source in used:
        shards = source_files(manifest["sources"][source])
        folders = {shard.rsplit("/", 1)[0] + "/" if "/" in shard else "" for shard in shards}
        present = {key for folder in folders for key in storage.list(folder)}
        missing += [shard for shard in shards if shard not in present]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(f"{storage.url}: {len(missing)} shards listed in manifest.json are missing ({shown}); "
                        "prepare the source again, or set data.skip_missing_shards=true to skip them")


def _check_image_caps(cfg: RunConfig, manifest: dict) -> None:
    """The largest image of each language-model stage's sources, at the stage's patch cap, fits in one row."""
    vision = cfg.model.vision
    for name in cfg.curriculum.order:
        stage = cfg.curriculum.stages[name]
        if stage.objective == "coca":
            continue  # whole images, no token row
        for source in _sampler(stage).sources():
            stats = manifest["sources"][source].get("image_stats", {})
            width, height = (stats.get(side, {}).get("max", 0) for side in ("width", "height"))
            if not width or not height:
                continue
            rows, cols = fit_grid(width, height, vision.patch_size, vision.merge_size, stage.max_image_patches)
            tokens = rows * cols // vision.merge_size**2 + 2
            if tokens > stage.seq_len:
                raise ConfigError(f"Invalid value curriculum.stages.{name}.max_image_patches="
                                  f"{stage.max_image_patches}: a {width}x{height} image of source {source} takes "
                                  f"{tokens} tokens, more than seq_len={stage.seq_len}; allowed is a cap whose "
                                  "images fit in a row")
