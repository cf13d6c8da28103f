"""Where each model part of a stage starts from: the parsing of a stage's ``init_from`` (train/init_from.py loads
the weights)."""

from __future__ import annotations

from typing import Any

from config.hf_config import HF_PREFIX
from config.schema import TRAINABLE_PARTS

__all__ = ["PARTS", "parse_init_from", "per_part"]

PARTS = TRAINABLE_PARTS


def per_part(init_from: Any, stage_names: list[str]) -> bool:
    """Whether ``init_from`` needs the per-part loader: a mapping, or ``hf:DIR`` / a stage name as a string (the
    string forms ``previous``, ``scratch`` and a checkpoint path keep their whole-model meaning)."""
    return not isinstance(init_from, str) or init_from.startswith(HF_PREFIX) or init_from in stage_names


def parse_init_from(init_from: Any, earlier: list[str], stage_names: list[str],
                    defined: list[str] | None = None) -> dict[str, str]:
    """Every part's source (the whole model's string form spread over the parts it concerns).

    A stage the recipe defines but this run's ``curriculum.order`` leaves out (e.g. ``curriculum.order=[vit_coca,
    vit_align]`` without ``text_pretrain``) cannot provide weights: its parts start from ``scratch``.

    Args:
        init_from: The recipe's value.
        earlier: The stages before this one, in order.
        stage_names: The stages of this run (``curriculum.order``): a later one's name is an error, not a path.
        defined: Every stage the recipe defines (default: ``stage_names``).

    Raises:
        ValueError: Unknown parts, ``previous`` for the first stage, a stage that does not come earlier.
    """
    skipped = set(defined or ()) - set(stage_names)
    if isinstance(init_from, str):
        if init_from.startswith(HF_PREFIX):
            return {part: init_from for part in PARTS[:3]} | {"coca": "scratch"}
        return dict.fromkeys(PARTS, init_from)
    if not isinstance(init_from, dict):
        raise ValueError(f"{init_from!r} is neither a source nor a mapping part -> source")
    unknown = [p for p in init_from if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown parts {unknown}; the parts are {', '.join(PARTS)}")
    sources = {part: str(init_from.get(part, "scratch")) for part in PARTS}
    sources = {part: "scratch" if source in skipped else source for part, source in sources.items()}
    for part, source in sources.items():
        if source == "previous" and not earlier:
            raise ValueError(f"{part}: 'previous' in the first stage (there is no previous stage)")
        if source in stage_names and source not in earlier:
            raise ValueError(f"{part}: stage '{source}' does not come before this one ({', '.join(earlier) or '-'})")
        if source.startswith(HF_PREFIX) and len(source) == len(HF_PREFIX):
            raise ValueError(f"{part}: 'hf:' needs a directory (hf:/path/to/checkpoint)")
    return sources
