"""Inter-site tier: what crosses the WAN between sites, and how often.

Import the modules themselves; this package imports none of them, so that its torch-free
modules (`codec_specs`, `link_model`) load without torch for the config and the planner.

- `codec_specs`: codec names, options and defaults, and the exact bytes each codec sends (no torch).
- `link_model`: what an all-gather costs on the sites' WAN links (no torch).
- `codecs`: compression of pseudo-gradients (`none`, `fp16`, `bf16`, `int8`, `int4`, `topk`,
  `lowrank`), error feedback, and the payload bytes the transport moves.
- `fragments`: sharded outer exchange (each parameter owned by one local rank) and Streaming
  DiLoCo fragments with their staggered schedule.
- `outer`: θ, pseudo-gradients, token-weighted averaging and the outer optimizer.
- `transport`: quorum and the all-gather through torchft, byte counts, the WAN emulation.
- `engine`: the cross-site half of a training step, for every strategy.
"""
