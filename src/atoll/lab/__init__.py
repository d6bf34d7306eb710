"""The WAN lab: a real shaped network on one machine (netns mode) or emulation in the transport.

`Lab` builds one network namespace per site with tbf-shaped veths (root only); without root the
transport's `WanModel` emulates the links. The scenario helpers pick the lab bandwidth that
reproduces a real deployment's communication/compute ratio.
"""

from atoll.lab.emulate import (
    DEFAULT_SCENARIO,
    SCENARIOS,
    Scenario,
    bandwidth_for_ratio,
    get_scenario,
    scenario_ratio,
    step_seconds_from_compute,
)
from atoll.lab.netns import Lab, LabSite, SiteLink, clean_leftovers, lab_available, site_links

__all__ = [
    "DEFAULT_SCENARIO",
    "SCENARIOS",
    "Lab",
    "LabSite",
    "Scenario",
    "SiteLink",
    "bandwidth_for_ratio",
    "clean_leftovers",
    "get_scenario",
    "lab_available",
    "scenario_ratio",
    "site_links",
    "step_seconds_from_compute",
]
