"""``python -m train recipe=<name> [key=value ...]``: run a recipe's curriculum (resuming if it was stopped).

Under ``torchrun`` every process runs this; the configuration is validated in each before any process group
exists, so a bad recipe fails at once with a message naming the key and what is allowed.
"""

from __future__ import annotations

import logging
import os
import sys

USAGE = """usage: python -m train recipe=<name> [key=value ...]

  recipe=<name>      one of: {recipes}
  key=value          Hydra overrides of any key of the schema (config/schema.py), e.g.
                     curriculum.stages.joint_pretrain.steps=100  optim.weight_decay=0.05  run_name=try2
  --config-dir DIR   a folder of your own recipes (recipe/<name>.yaml, stage/, ...), as recipe_dir=DIR
  --print-config     print the composed, validated configuration and exit
  dry_run=true world_size=N [device_memory_gb=80]
                     build the real model on meta under N simulated ranks and print per-rank memory per stage

Rerunning the same command continues a stopped run from its last checkpoint.
"""


def main(argv: list[str]) -> int:
    from train.signals import STOP

    # Before the heavy imports: a stop signal arriving during them is recorded, not fatal.
    installed = STOP.install()
    try:
        return _main(argv)
    finally:
        if installed:
            STOP.restore()


def _main(argv: list[str]) -> int:
    from config import ConfigError, available_recipes, load_config, split_recipe_dir

    argv = _config_dir_as_override(argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print(USAGE.format(recipes=", ".join(available_recipes(split_recipe_dir(argv)[0]))))
        return 0
    print_only = "--print-config" in argv
    overrides = [arg for arg in argv if arg != "--print-config"]
    try:
        cfg = load_config(overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if print_only:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        return 0
    if cfg.dry_run:
        from train.dry_run import run_dry_run

        try:
            return run_dry_run(cfg)
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s")
    from data.loader import DataError
    from train.trainer import RunLocked, TrainingDiverged, run_curriculum

    try:
        run_curriculum(cfg)
    except (ConfigError, DataError) as error:  # what the user can fix: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (TrainingDiverged, RunLocked) as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    return 0


def _config_dir_as_override(argv: list[str]) -> list[str]:
    """``--config-dir DIR`` (or ``--config-dir=DIR``, Hydra's spelling) as the ``recipe_dir=DIR`` override."""
    out, args = [], iter(argv)
    for arg in args:
        if arg == "--config-dir":
            out.append(f"recipe_dir={next(args, '')}")
        elif arg.startswith("--config-dir="):
            out.append("recipe_dir=" + arg.split("=", 1)[1])
        else:
            out.append(arg)
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
