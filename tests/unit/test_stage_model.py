"""A pipeline stage's view of a rank's pruned model (parallel/pipeline.py's stage_model): only the stage's modules,
shared with the rank's model, which stays as it was."""

from __future__ import annotations

import torch

from model.registry import FLAVORS
from model.vlm import KimiVL
from parallel.pipeline import StageModule, stage_model


def test_stage_views_share_the_modules_and_leave_the_model_whole():
    with torch.device("meta"):
        model = KimiVL(FLAVORS["debug"])
    keys = list(model.decoder.layers)
    first, last = stage_model(model, keys[:1], True, False), stage_model(model, keys[1:], False, True)
    assert list(model.decoder.layers) == keys and model.coca is not None and model.decoder.norm is not None
    assert list(first.decoder.layers) == keys[:1] and first.decoder.norm is None and first.coca is None
    assert first.vision is model.vision and first.decoder.embed_tokens is model.decoder.embed_tokens
    assert list(last.decoder.layers) == keys[1:] and last.vision is None and last.decoder.embed_tokens is None
    assert last.decoder.layers[keys[-1]] is model.decoder.layers[keys[-1]] and last.decoder.norm is model.decoder.norm
    model.set_rope_theta(800000.0)  # a curriculum stage's new base reaches every stage
    assert first.decoder.rope.theta == last.decoder.rope.theta == 800000.0
    stage = StageModule(model, keys[1:], is_first=False, is_last=True)
    expected = {id(p) for key in keys[1:] for p in model.decoder.layers[key].parameters()}
    expected |= {id(p) for part in (model.decoder.norm, model.decoder.output) for p in part.parameters()}
    assert {id(p) for p in stage.parameters()} == expected
