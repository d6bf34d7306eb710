"""Inter-site tier: what crosses the WAN between sites, and how often.

Pure-tensor building blocks (no `torch.distributed`, unit-tested on CPU):

- `codecs`: compression of pseudo-gradients (`none`, `fp16`, `bf16`, `int8`, `int4`, `topk`,
  `lowrank`), error feedback, and byte buffers for the transport.
- `fragments`: sharded outer exchange (each parameter owned by one local rank) and Streaming
  DiLoCo fragments with their staggered schedule.
- `outer`: θ, pseudo-gradients, token-weighted averaging and the outer optimizer.
"""

from atoll.sync.codecs import (
    CODEC_NAMES,
    Codec,
    Encoded,
    ErrorFeedback,
    decode,
    get_codec,
    pack,
    pack_payload,
    unpack,
    unpack_payload,
)
from atoll.sync.fragments import StreamingSchedule, assign_owners, split_fragments
from atoll.sync.outer import OuterOptimizer, weighted_average

__all__ = [
    "CODEC_NAMES",
    "Codec",
    "Encoded",
    "ErrorFeedback",
    "OuterOptimizer",
    "StreamingSchedule",
    "assign_owners",
    "decode",
    "get_codec",
    "pack",
    "pack_payload",
    "split_fragments",
    "unpack",
    "unpack_payload",
    "weighted_average",
]
