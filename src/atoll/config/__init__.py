"""Configuration: pydantic schemas, YAML loading and dotted command-line overrides."""

from atoll.config.load import apply_overrides, dump_config, load_config, parse_overrides, read_yaml, validate
from atoll.config.schema import (
    DataSection,
    ModelSection,
    ParallelSection,
    RunConfig,
    RunSection,
    SyncSection,
    TrainSection,
)

__all__ = [
    "DataSection",
    "ModelSection",
    "ParallelSection",
    "RunConfig",
    "RunSection",
    "SyncSection",
    "TrainSection",
    "apply_overrides",
    "dump_config",
    "load_config",
    "parse_overrides",
    "read_yaml",
    "validate",
]
