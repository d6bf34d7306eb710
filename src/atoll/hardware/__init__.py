"""Hardware: the device catalog (datasheet figures and achievable efficiencies), user-extendable.

Pure Python (no torch): topology validation and the planner use it anywhere.
"""

from atoll.hardware.catalog import BUILTIN, DeviceSpec, replace_fields
from atoll.hardware.registry import ENV_VAR, get_device, list_devices, reset_catalog, use_hardware_file

__all__ = [
    "BUILTIN",
    "ENV_VAR",
    "DeviceSpec",
    "get_device",
    "list_devices",
    "replace_fields",
    "reset_catalog",
    "use_hardware_file",
]
