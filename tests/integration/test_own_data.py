"""Pointing the curriculum at your own root: one override, every check before the first step, one line (exit 2) for
anything wrong, mixture overrides that replace, your own recipe folder, and no demo corpus at a mistyped path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from config import ConfigError, load_config
from data import prepare
from data.loader import DataError
from data.tokenizer import __main__ as tokenizer_cli
from train.preflight import check_run

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def own_root(tmp_path_factory) -> Path:
    """A root with two sources of the recipe's names, ``caption`` (captioned PNGs) and ``text``, prepared from
    plain JSONL, and its own tokenizer."""
    raw = tmp_path_factory.mktemp("raw")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(24):
        pixels = rng.integers(0, 256, (56 + 14 * (i % 3), 70, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(raw / f"{i}.png")
        lines.append({"image": f"{i}.png", "text": f"a noisy picture number {i} of {['red', 'blue'][i % 2]} dots"})
    (raw / "captions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (raw / "words.jsonl").write_text("".join(json.dumps({"text": f"entry {i}: a word that means thing {i % 7} "
                                                                  "in the dictionary of things"}) + "\n"
                                             for i in range(40)))
    root = tmp_path_factory.mktemp("root")
    for source, name in (("caption", "captions"), ("text", "words")):
        assert prepare.main(["--input", str(raw / f"{name}.jsonl"), "--out", str(root), "--source", source,
                             "--workers", "1", "--samples-per-shard", "10"]) == 0
    assert tokenizer_cli.main(["train", str(root), "--vocab-size", "400"]) == 0
    return root


def run_train(*args: str, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=cwd, env={**ENV, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=timeout)


def test_missing_sources_are_listed_for_every_stage_before_anything_trains(own_root):
    cfg = load_config(["recipe=debug", f"data.root={own_root}"])
    with pytest.raises(DataError) as error:
        check_run(cfg)
    message = str(error.value)
    for stage in cfg.curriculum.order:  # text_pretrain reads text only, which the root has
        assert (f"{stage}: " in message) == (stage != "text_pretrain"), stage
    assert "vit_coca: grounding, ocr;" in message and "long_ctx_128k: grounding, interleaved, long_doc, ocr" in message
    assert "data.missing_sources=drop" in message and "it has: caption, text" in message


def test_drop_renormalizes_each_mixture_over_the_sources_the_root_has(own_root, tmp_path):
    cfg = load_config(["recipe=debug", f"data.root={own_root}", "data.missing_sources=drop"])
    check_run(cfg)
    stages = cfg.curriculum.stages
    assert stages["vit_coca"].mixture.multimodal_sources == {"caption": 0.5}
    pretrain = stages["joint_pretrain"].mixture
    assert (pretrain.text_sources, pretrain.multimodal_sources) == ({"text": 1.0}, {"caption": 0.3})
    assert (pretrain.multimodal_share_start, pretrain.multimodal_share_end) == (0.0, 0.5)  # the ramp is kept
    long = stages["long_ctx_32k"].mixture
    assert long.long_sources == {} and long.long_share == 0.0 and long.multimodal_sources == {"caption": 0.3}
    # A stage left with no source fails at the start, naming it.
    text_only = tmp_path / "text_only"
    text_only.mkdir()
    manifest = json.loads((own_root / "manifest.json").read_text())
    manifest["sources"] = {"text": manifest["sources"]["text"]}
    (text_only / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config(["recipe=debug", f"data.root={text_only}", "data.missing_sources=drop"])
    with pytest.raises(DataError, match="stage vit_coca: no image-text source left"):
        check_run(cfg)


def test_a_mapping_override_replaces_the_recipes_mapping_and_sections_still_merge():
    cfg = load_config(["recipe=debug", "curriculum.stages.joint_pretrain.mixture.multimodal_sources={caption: 1.0}",
                       "curriculum.stages.vit_coca.lr={peak_lr: 0.01}"])
    assert cfg.curriculum.stages["joint_pretrain"].mixture.multimodal_sources == {"caption": 1.0}
    lr = cfg.curriculum.stages["vit_coca"].lr
    assert (lr.peak_lr, lr.warmup_steps) == (0.01, 3)  # a section (not a mapping) merges as before


def test_recipes_from_your_own_folder(own_root, tmp_path, capsys):
    recipes = tmp_path / "my_recipes"
    (recipes / "recipe").mkdir(parents=True)
    (recipes / "recipe" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: debug\n  - override /curriculum: debug\nrecipe: mine\n"
        f"data:\n  root: {own_root}\n  missing_sources: drop\ncurriculum:\n  order: [vit_coca, joint_pretrain]\n")
    cfg = load_config(["recipe=mine", f"recipe_dir={recipes}"])
    assert cfg.data.root == str(own_root) and cfg.curriculum.order == ["vit_coca", "joint_pretrain"]
    assert cfg.recipe_dir == str(recipes)
    with pytest.raises(ConfigError, match="mine"):  # not found without the folder
        load_config(["recipe=mine"])
    from train.__main__ import main

    assert main(["--config-dir", str(recipes), "recipe=mine", "--print-config"]) == 0
    assert f"root: {own_root}" in capsys.readouterr().out


def test_one_line_exit_2_for_every_data_error_and_no_demo_corpus_at_a_mistyped_root(own_root, tmp_path):
    typo = tmp_path / "demo_dta"
    done = run_train("recipe=debug", f"data.root={typo}", f"output_dir={tmp_path / 'out'}")
    assert done.returncode == 2 and f"data.root={typo}: no such folder" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not typo.exists() and not (tmp_path / "out").exists()  # nothing generated, nothing trained
    done = run_train("recipe=debug", f"data.root={own_root}", f"output_dir={tmp_path / 'out'}")
    assert done.returncode == 2 and "lacks sources the curriculum mixes" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    done = run_train("recipe=debug", f"data.root={own_root}", "data.missing_sources=drop",
                     "model.decoder.vocab_size=300", f"output_dir={tmp_path / 'out'}")
    assert done.returncode == 2 and "Invalid value model.decoder.vocab_size=300: the tokenizer of" in done.stderr
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(own_root), str(broken)], check=True)
    (broken / "text" / "shard-000002.tar").unlink()
    done = run_train("recipe=debug", f"data.root={broken}", "data.missing_sources=drop", f"output_dir={tmp_path / 'o'}")
    assert done.returncode == 2 and "text/shard-000002.tar" in done.stderr and "skip_missing_shards" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "o").exists()


def test_the_default_root_without_the_demo_corpus_names_the_command_that_makes_it(tmp_path, monkeypatch):
    done = run_train("recipe=debug", f"output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == ["error: data.root=demo_data: the demo corpus is not generated yet; "
                                                "generate it first with python -m data.synthetic --out demo_data"]
    assert not (tmp_path / "demo_data").exists() and not (tmp_path / "out").exists()  # a run generates nothing
    made = subprocess.run([sys.executable, "-m", "data.synthetic", "--out", "demo_data", "--scale", "0.05"],
                          cwd=tmp_path, env={**ENV, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    monkeypatch.chdir(tmp_path)
    check_run(load_config(["recipe=debug"]))  # the command the message names is all it takes


def test_the_curriculum_trains_on_your_own_root_with_one_override(own_root, tmp_path):
    out = tmp_path / "out"
    steps = [f"curriculum.stages.{name}.{key}={value}" for name in ("vit_coca", "joint_pretrain")
             for key, value in (("steps", 2), ("checkpoint_interval", 0), ("lr.warmup_steps", 1))]
    done = run_train("recipe=debug", f"data.root={own_root}", "data.missing_sources=drop", f"output_dir={out}",
                     "run_name=mine", "log.progress_bar=false", "curriculum.order=[vit_coca,joint_pretrain]", *steps)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stage joint_pretrain: mixture over the sources" in done.stderr
    summary = json.loads((out / "mine" / "summary.json").read_text())
    assert summary["vit_coca"]["steps"] == 2 and summary["joint_pretrain"]["steps"] == 2
    assert not (REPO / "demo_data").exists() or (REPO / "demo_data" / "manifest.json").exists()
