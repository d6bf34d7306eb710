"""Starting a run across data centers: `atoll lighthouse` (the run's membership service) and
`atoll site` (one data center's entry point). The launchers that start a whole run on one machine
(`atoll.sync.launch`, used by `atoll train --topology` and `atoll lab run`) start these commands."""
