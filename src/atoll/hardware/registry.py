"""The active catalog: the built-in devices plus the user's hardware YAML files.

A hardware file adds devices or overrides fields of existing ones (e.g. efficiencies measured by
`atoll calibrate`)::

    devices:
      a100-80g: {matmul_efficiency: 0.70, efficiency_source: calibrated}   # override fields
      my-npu: {base: ascend-910b, peak_tflops: 280, name: "Ascend 910B4"}   # derive a device
      new-gpu:                                                               # a new device
        {name: X1, vendor: Acme, backend: nccl, peak_tflops: 400, memory_gb: 96,
         memory_bw_tbs: 3.0, intra_node_gbs: 300}

Files come from the ``ATOLL_HARDWARE`` environment variable (paths separated by ``:``), read on
first use, and from `use_hardware_file` (e.g. ``atoll plan --hardware FILE``), later files
overriding earlier ones. The catalog is process-wide: topology validation and the planner see
the same devices.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from atoll.errors import AtollError
from atoll.hardware.catalog import ALIASES, BUILTIN, DeviceSpec, replace_fields

ENV_VAR = "ATOLL_HARDWARE"
_KIND = re.compile(r"^[a-z][a-z0-9.-]{0,40}$")

_catalog: dict[str, DeviceSpec] | None = None
_files: list[Path] = []


def _active() -> dict[str, DeviceSpec]:
    global _catalog
    if _catalog is None:
        _catalog = dict(BUILTIN)
        for part in os.environ.get(ENV_VAR, "").split(":"):
            if part.strip():
                _merge_file(_catalog, Path(part.strip()), origin=f"${ENV_VAR}")
    return _catalog


def get_device(kind: str) -> DeviceSpec:
    """The catalog entry for `kind` (aliases such as ``a100`` accepted).

    Raises `AtollError` listing the known kinds when `kind` is unknown.
    """
    catalog = _active()
    key = ALIASES.get(kind, kind)
    try:
        return catalog[key]
    except KeyError:
        raise AtollError(
            f"unknown device kind {kind!r}; known kinds: {', '.join(sorted(catalog))} "
            f"(add your own in a hardware YAML, see docs/hardware.md)"
        ) from None


def list_devices() -> list[DeviceSpec]:
    """Every device of the active catalog, sorted by kind."""
    return [spec for _, spec in sorted(_active().items())]


def use_hardware_file(path: Path) -> None:
    """Merge a hardware YAML into the active catalog (later files win).

    Raises `AtollError` for a missing file, bad YAML, an unknown field or an invalid value; the
    catalog is left unchanged in that case.
    """
    catalog = dict(_active())
    _merge_file(catalog, Path(path), origin=str(path))
    global _catalog
    _catalog = catalog
    _files.append(Path(path))


def reset_catalog() -> None:
    """Forget merged files; the next lookup re-reads ``ATOLL_HARDWARE``. For tests."""
    global _catalog
    _catalog = None
    _files.clear()


def _merge_file(catalog: dict[str, DeviceSpec], path: Path, *, origin: str) -> None:
    if not path.is_file():
        raise AtollError(f"hardware file {path} (from {origin}) does not exist: check the path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise AtollError(f"hardware file {path} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict) or set(data) - {"devices"} or not isinstance(data.get("devices", {}), dict):
        raise AtollError(f"hardware file {path} must be a mapping with one key, `devices:` (kind -> fields)")
    for kind, fields in (data.get("devices") or {}).items():
        catalog[str(kind)] = _entry(catalog, str(kind), fields, path=path)


def _entry(catalog: dict[str, DeviceSpec], kind: str, fields: Any, *, path: Path) -> DeviceSpec:
    if not _KIND.match(kind):
        raise AtollError(
            f"hardware file {path}: device kind {kind!r} must be lowercase letters, digits, dots and dashes"
        )
    if not isinstance(fields, dict):
        raise AtollError(f"hardware file {path}: devices.{kind} must be a mapping of fields")
    fields = dict(fields)
    base_kind = fields.pop("base", None)
    if base_kind is not None:
        base_key = ALIASES.get(str(base_kind), str(base_kind))
        if base_key not in catalog:
            raise AtollError(
                f"hardware file {path}: devices.{kind}.base {base_kind!r} is not a known kind "
                f"({', '.join(sorted(catalog))})"
            )
        base = catalog[base_key]
    else:
        base = catalog.get(ALIASES.get(kind, kind))
    try:
        if base is not None:
            return replace_fields(base, kind=kind, **fields)
        return DeviceSpec(kind=kind, **fields)
    except TypeError as exc:
        raise AtollError(
            f"hardware file {path}: devices.{kind} is a new device and needs name, vendor, backend, peak_tflops, "
            f"memory_gb, memory_bw_tbs and intra_node_gbs ({exc})"
        ) from None
    except AtollError as exc:
        raise AtollError(f"hardware file {path}: {exc}") from None
