"""The run configuration: schema (typed dataclasses), loading from the Hydra recipes, and every check.

The lowest layer of the project: it imports nothing else of ours, so any layer may use it.
"""

from config.load import available_recipes, compose_recipe, load_config, split_recipe_dir, to_run_config
from config.schema import (
    ACTIVATION_CHECKPOINT_POLICIES,
    OBJECTIVES,
    RECIPES_DIR,
    TRAINABLE_PARTS,
    AugmentConfig,
    CheckpointConfig,
    ConfigError,
    CurriculumConfig,
    DataConfig,
    LogConfig,
    LRScheduleConfig,
    MixtureConfig,
    OptimConfig,
    ParallelConfig,
    PrecisionConfig,
    RunConfig,
    RuntimeConfig,
    StageConfig,
)
from config.validate import validate

__all__ = ["ACTIVATION_CHECKPOINT_POLICIES", "OBJECTIVES", "RECIPES_DIR", "TRAINABLE_PARTS", "AugmentConfig",
           "CheckpointConfig", "ConfigError", "CurriculumConfig", "DataConfig", "LRScheduleConfig", "LogConfig",
           "MixtureConfig", "OptimConfig", "ParallelConfig", "PrecisionConfig", "RunConfig", "RuntimeConfig",
           "StageConfig",
           "available_recipes", "compose_recipe", "load_config", "split_recipe_dir", "to_run_config", "validate"]
