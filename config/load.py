"""Loading a run's configuration: compose a recipe with Hydra, type it against the schema, validate it."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from config.flavors import FLAVORS
from config.hf_config import HFConfigError, model_args_from_recipe
from config.model import ModelArgs
from config.schema import RECIPES_DIR, ConfigError, CurriculumConfig, RunConfig, StageConfig
from config.validate import validate

__all__ = ["available_recipes", "compose_recipe", "load_config", "split_recipe_dir", "to_run_config"]

# Keys of earlier schemas that configurations stored in older checkpoints and run directories still carry; they
# mean nothing now and are dropped. data.generate_if_missing: the demo corpus is made by `python -m data.synthetic`.
RETIRED_KEYS = (("data", "generate_if_missing"),)


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
    for section, key in RETIRED_KEYS:
        if isinstance(raw.get(section), dict):
            raw[section].pop(key, None)
    model_raw = raw.pop("model", {}) or {}
    try:  # a flavor, or hf:<dir> for the whole model or a part (config/hf_config.py)
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
