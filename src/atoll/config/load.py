"""YAML loading, dotted command-line overrides, one-line validation errors, and warnings for
keys that the rest of the config leaves unread."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from atoll.config.schema import ignored_settings
from atoll.errors import AtollError

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; raises AtollError for a missing file or malformed YAML."""
    path = Path(path)
    if not path.is_file():
        raise AtollError(f"config file {path} does not exist: check the path (examples live in examples/configs/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise AtollError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise AtollError(
            f"config file {path} must hold a mapping of sections (run:, model:, ...), not {type(data).__name__}"
        )
    return data


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn ``--train.steps=100`` or ``--train.steps 100`` into ``{"train.steps": 100}``.

    Values are parsed as YAML scalars, so ``true``, ``3``, ``1e-3`` and ``null`` get their types.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise AtollError(
                f"unexpected argument {arg!r}: config overrides look like --section.key=value (e.g. --train.steps=100)"
            )
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args):
                raise AtollError(f"override --{key} has no value: write --{key}=VALUE")
            value = args[i + 1]
            i += 1
        try:
            out[key] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            out[key] = value
        i += 1
    return out


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a nested mapping (a copy); unknown keys are caught by validation."""
    result = _deep_copy(data)
    for dotted, value in overrides.items():
        node = result
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise AtollError(f"override --{dotted}: {part} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return result


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def validate(schema: type[M], data: dict[str, Any], *, source: str, warn_ignored: bool = True) -> M:
    """Validate `data` against `schema`; the first problem becomes a one-line AtollError.

    A key that validates but that the config's other settings leave unread (see
    `atoll.config.schema.ignored_settings`) is logged as a warning naming `source`, unless
    `warn_ignored` is False (a process whose launcher already warned about the same config).
    """
    try:
        config = schema.model_validate(data)
    except ValidationError as exc:
        raise AtollError(f"{source}: {describe_error(schema, exc)}") from None
    if warn_ignored:
        for message in ignored_settings(config):
            log.warning("%s: %s", source, message)
    return config


def describe_error(schema: type[BaseModel], exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        known = _known_keys(schema, err["loc"][:-1])
        hint = f" (known keys here: {', '.join(known)})" if known else ""
        return f"unknown key {loc!r}{hint}: remove it or fix its spelling"
    given = err.get("input")
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    where = f"{loc}: " if loc else ""
    if kind == "missing":
        return f"{where}required key is missing"
    if isinstance(given, dict):
        return f"{where}{msg}"
    return f"{where}{msg} (got {given!r})"


def _known_keys(schema: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    model: Any = schema
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return sorted(getattr(model, "model_fields", {}).keys())


def load_config(schema: type[M], path: Path, overrides: list[str] | None = None, *, warn_ignored: bool = True) -> M:
    """Read `path`, apply ``--section.key=value`` overrides, validate against `schema`.

    Raises AtollError for a missing file, bad YAML or an invalid config (one line naming the
    key and the fix); logs a warning per key that the config leaves unread (see `validate`).
    """
    data = apply_overrides(read_yaml(path), parse_overrides(overrides or []))
    return validate(schema, data, source=f"config {path}", warn_ignored=warn_ignored)


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML (paths as strings), for the run directory."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
