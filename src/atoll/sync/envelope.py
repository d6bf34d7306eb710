"""What a site puts around its payload on the WAN: who sends it, for which round, θ's digest, a tag.

Every exchange carries, per site, one fixed-size envelope beside the codec's payload bytes:

    magic "ATL1" | kind | flags | pace | unit | round | token weight | body length | step
    | θ digest (32) | site name (32) | site address (48) | HMAC-SHA256 tag (32)

The tag covers every field before it and the body's bytes, with a key derived from the run's
secret (`atoll.sync.auth`), so a site that does not hold the secret cannot get an update applied,
and a byte altered in transit makes the whole contribution refused. The name and address are
what the sender claims: they are only trusted once the tag checks, and are logged either way, so
that an operator can find a refused site. The pace (the sender's step time, `atoll.sync.pacing`; 0 when
unknown) lets sites balance their rounds. The round number and digest let every site see, from
the same gathered envelopes, who holds which θ (`atoll.sync.agreement`); the step (the sender's
inner step when it sent) tells a site that heals forward where the others are. Torch-free but for the
tensors it reads; no I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

from atoll.errors import AtollError
from atoll.sync.auth import TAG_BYTES, derive_key, tag, verify

MAGIC = b"ATL1"
KIND_UPDATE = 0  # a round's payload: the sender's pseudo-gradient for the unit
KIND_CHECK = 1  # no payload: the sender has finished and shows its final θ's digest
FLAG_MOMENTUM = 1  # the sender's outer optimizer holds a momentum buffer for the unit
DIGEST_BYTES = 32
_FIELDS = struct.Struct("<4sBBHIQdQQ32s32s48s")
ENVELOPE_BYTES = _FIELDS.size + TAG_BYTES  # 188


class Refused(AtollError):
    """A contribution that must not be applied: unauthenticated, altered, or malformed."""

    def __init__(self, reason: str, *, claimed_site: str = "?", claimed_address: str = "?") -> None:
        super().__init__(f"refused a contribution claiming site {claimed_site!r} at {claimed_address}: {reason}")
        self.reason = reason
        self.claimed_site = claimed_site
        self.claimed_address = claimed_address


@dataclass(frozen=True)
class Header:
    """The envelope's fields: what a site says about its contribution to one exchange."""

    site: str
    address: str
    unit: int  # index of the exchange unit (the model, or a streaming fragment)
    round: int  # rounds of this unit the sender has applied
    weight: float  # tokens the payload stands for
    body_bytes: int
    digest: bytes  # SHA-256 of the sender's θ for its share of the unit, before this round
    kind: int = KIND_UPDATE
    flags: int = 0
    pace: int = 0  # the sender's step time, `atoll.sync.pacing.encode_pace` (16 bits; 0: not measured)
    step: int = 0  # the sender's inner step when it sent

    @property
    def has_momentum(self) -> bool:
        return bool(self.flags & FLAG_MOMENTUM)


def _text(value: str, size: int, what: str) -> bytes:
    raw = value.encode()
    if len(raw) > size:
        raise AtollError(f"{what} {value!r} is longer than {size} bytes; use a shorter one")
    return raw


def _as_view(body: torch.Tensor) -> memoryview:
    return memoryview(body.detach().contiguous().cpu().numpy())


class Sealer:
    """Seals and opens envelopes with the run's secret; one per rank, stateless after construction."""

    def __init__(self, secret: bytes) -> None:
        self._update_key = derive_key(secret, "update-tag")
        self._heal_key = derive_key(secret, "heal-tag")

    def seal(self, header: Header, body: torch.Tensor) -> torch.Tensor:
        """The envelope (uint8, `ENVELOPE_BYTES`) for `header` and the payload `body` (1-D uint8)."""
        if body.dtype != torch.uint8 or body.dim() != 1 or body.numel() != header.body_bytes:
            raise AtollError(f"the body must be 1-D uint8 of {header.body_bytes} bytes, got {list(body.shape)}")
        if len(header.digest) != DIGEST_BYTES:
            raise AtollError(f"a θ digest has {DIGEST_BYTES} bytes, got {len(header.digest)}")
        fields = _FIELDS.pack(
            MAGIC,
            header.kind,
            header.flags,
            header.pace,
            header.unit,
            header.round,
            header.weight,
            header.body_bytes,
            header.step,
            header.digest,
            _text(header.site, 32, "site name"),
            _text(header.address, 48, "site address"),
        )
        mac = tag(self._update_key, fields, _as_view(body))
        return torch.frombuffer(bytearray(fields + mac), dtype=torch.uint8)

    def open(self, envelope: torch.Tensor, body: torch.Tensor) -> tuple[Header, torch.Tensor]:
        """The header and the payload (the first `body_bytes` of `body`, which the transport may
        have padded) of a peer's contribution. Raises `Refused` if its tag does not check."""
        raw = bytes(envelope.detach().cpu().numpy().tobytes())
        if len(raw) != ENVELOPE_BYTES:
            raise Refused(f"an envelope of {len(raw)} bytes, expected {ENVELOPE_BYTES}")
        fields, mac = raw[: _FIELDS.size], raw[_FIELDS.size :]
        magic, kind, flags, pace, unit, rnd, weight, length, step, digest, site, address = _FIELDS.unpack(fields)
        claimed = {
            "claimed_site": site.rstrip(b"\0").decode(errors="replace"),
            "claimed_address": address.rstrip(b"\0").decode(errors="replace"),
        }
        if magic != MAGIC:
            raise Refused("not an atoll envelope (another version or protocol)", **claimed)
        if length > body.numel():
            raise Refused(f"announces {length} payload bytes, {body.numel()} arrived", **claimed)
        payload = body[:length]
        if not verify(self._update_key, mac, fields, _as_view(payload)):
            raise Refused("its authentication tag does not match the run's secret (wrong secret or altered)", **claimed)
        header = Header(
            site=claimed["claimed_site"],
            address=claimed["claimed_address"],
            unit=unit,
            round=rnd,
            weight=weight,
            body_bytes=length,
            digest=digest,
            kind=kind,
            flags=flags,
            pace=pace,
            step=step,
        )
        return header, payload

    def heal_tag(self, unit: int, rnd: int, body: torch.Tensor) -> bytes:
        """The tag a heal transfer carries over (unit, round, θ and momentum bytes)."""
        return tag(self._heal_key, struct.pack("<IQ", unit, rnd), _as_view(body))

    def heal_verify(self, unit: int, rnd: int, body: torch.Tensor, mac: bytes) -> bool:
        return verify(self._heal_key, mac, struct.pack("<IQ", unit, rnd), _as_view(body))
