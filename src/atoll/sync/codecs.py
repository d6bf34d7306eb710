"""Codecs for what crosses the WAN: pseudo-gradients, compressed before they leave a site.

Who calls: the sync engine. Each site encodes its pseudo-gradient tensors, ships the payload, and
every site decodes every peer's payload with the same codec before averaging. Pure tensor code:
no `torch.distributed`, any device; nothing blocks beyond the device's own kernels.

Codecs (`get_codec(name, **options)`, or `codec_from_config(sync_section)`): none (as is), fp16
(clamped to ±65504), bf16, int8 and int4 (blockwise absmax), topk (the k largest |x|, sorted
indices + values), lowrank (P (m×r, orthonormal) and Q (c×r), x ≈ P Qᵀ). Their names, option
defaults and payload sizes live in `atoll.sync.codec_specs` (torch-free, so the config and the
planner read the same table): `Codec.payload_bytes` gives the size for a shape before encoding,
and `Encoded.num_bytes`, exactly the sum of the payload tensors' `nbytes`, is the same number.
`pack_payload` puts those bytes and nothing else on the wire: the receiver knows the layout from
its own encoding (the engine's envelope, `atoll.sync.envelope`, adds a fixed header). Inputs
are expected finite: a NaN or inf is not checked for here (the engine checks what it receives).
"""

from __future__ import annotations

import inspect
import math
import zlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from atoll.errors import AtollError
from atoll.sync.codec_specs import (
    CODEC_NAMES,
    CODEC_SYNC_KEYS,
    DEFAULT_BLOCK_SIZE,
    DEFAULT_LOWRANK_RANK,
    DEFAULT_TOPK_FRACTION,
    SYNC_KEY_OPTIONS,
    blockquant_bytes,
    index_bytes,
    lowrank_bytes,
    lowrank_factored,
    topk_bytes,
    topk_kept,
)

if TYPE_CHECKING:
    from atoll.config.schema import SyncSection

__all__ = [
    "CODEC_NAMES",
    "Codec",
    "Encoded",
    "ErrorFeedback",
    "codec_from_config",
    "decode",
    "get_codec",
    "pack_payload",
    "unpack_payload",
]

_FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_FP16_MAX = 65504.0


@dataclass(frozen=True, eq=False)
class Encoded:
    """One tensor as it crosses the WAN: the payload tensors plus what decoding needs.

    `payload` holds plain tensors exactly as they would be sent (uint8, int8, fp16, int32, ...);
    `shape` and `dtype` are the original tensor's, restored by decoding; `meta` holds small
    integer parameters of the codec (block size, rank, ...).
    """

    codec: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    payload: list[Tensor]
    meta: dict[str, int] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        """Elements of the original tensor."""
        return math.prod(self.shape)

    @property
    def num_bytes(self) -> int:
        """Exact payload size in bytes: the sum of the payload tensors' `nbytes`."""
        return sum(t.nbytes for t in self.payload)


def _malformed(enc: Encoded, what: str) -> AtollError:
    return AtollError(
        f"malformed {enc.codec!r} payload for a tensor of shape {list(enc.shape)}: {what}; "
        "every site must run the same atoll version and sync codec"
    )


def _float_dtype(value: str, *, option: str, allowed: Sequence[str]) -> torch.dtype:
    if value not in allowed:
        raise AtollError(f"codec option {option}={value!r} is not valid; use one of {', '.join(allowed)}")
    return _FLOAT_DTYPES[value]


class Codec(ABC):
    """Turns a tensor into an `Encoded` payload and back.

    `encode` never modifies its input and returns fresh tensors (no aliasing of `x`); `decode`
    returns a new tensor of the original shape and dtype, on the payload's device. `key` names
    the tensor across rounds for codecs that keep state (lowrank's warm start); stateless codecs
    ignore it. Decoding depends only on the `Encoded`, never on this instance's options, so any
    instance of the same codec decodes a peer's payload.
    """

    name: ClassVar[str]
    lossless: ClassVar[bool] = False

    @abstractmethod
    def encode(self, x: Tensor, *, key: str | None = None) -> Encoded:
        """Encode `x` (any shape, any float dtype, empty included); does not raise."""

    @abstractmethod
    def payload_bytes(self, shape: Sequence[int], *, itemsize: int = 4) -> int:
        """Bytes `encode` sends for a tensor of `shape` with `itemsize` bytes per element: exactly
        the `num_bytes` of its `Encoded` (`atoll.sync.codec_specs` holds the formulas)."""

    @abstractmethod
    def _decode(self, enc: Encoded) -> Tensor:
        """The decoded values, `enc.numel` of them in any shape and float dtype (a fresh tensor);
        `decode` casts and reshapes. Raises `AtollError` for a malformed payload."""

    def decode(self, enc: Encoded) -> Tensor:
        """The tensor `enc` stands for, in its original shape and dtype.

        Raises `AtollError` if `enc` came from another codec or its payload is malformed (it may
        come from the network).
        """
        if enc.codec != self.name:
            raise AtollError(
                f"payload was encoded with codec {enc.codec!r}, this site uses {self.name!r}; "
                "every site must use the same sync codec"
            )
        out = self._decode(enc)
        return out.to(enc.dtype).reshape(enc.shape)

    def state_dict(self) -> dict[str, Any]:
        """Codec state to checkpoint (empty for stateless codecs)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 -- no-op default, kept by stateless codecs
        """Restore what `state_dict` returned."""

    def _encoded(self, x: Tensor, payload: list[Tensor], **meta: int) -> Encoded:
        return Encoded(self.name, tuple(x.shape), x.dtype, payload, dict(meta))


class NoneCodec(Codec):
    """No compression: the tensor's own bytes (a pseudo-gradient is fp32)."""

    name = "none"
    lossless = True

    def encode(self, x: Tensor, *, key: str | None = None) -> Encoded:
        return self._encoded(x, [x.detach().reshape(-1).clone()])

    def payload_bytes(self, shape: Sequence[int], *, itemsize: int = 4) -> int:
        return math.prod(shape) * itemsize

    def _decode(self, enc: Encoded) -> Tensor:
        _expect_numels(enc, [enc.numel])
        return enc.payload[0].clone()  # already in enc.dtype: lossless for every dtype


class CastCodec(Codec):
    """Cast to a 16-bit float; fp16 saturates at ±65504 instead of overflowing to inf."""

    def __init__(self, target: torch.dtype) -> None:
        self._target = target

    def encode(self, x: Tensor, *, key: str | None = None) -> Encoded:
        flat = x.detach().reshape(-1)
        if self._target == torch.float16:
            flat = flat.float().clamp(-_FP16_MAX, _FP16_MAX)
        return self._encoded(x, [flat.to(self._target)])

    def payload_bytes(self, shape: Sequence[int], *, itemsize: int = 4) -> int:
        return math.prod(shape) * self._target.itemsize

    def _decode(self, enc: Encoded) -> Tensor:
        _expect_numels(enc, [enc.numel])
        return enc.payload[0].float()


class Fp16Codec(CastCodec):
    name = "fp16"

    def __init__(self) -> None:
        super().__init__(torch.float16)


class Bf16Codec(CastCodec):
    name = "bf16"

    def __init__(self) -> None:
        super().__init__(torch.bfloat16)


class BlockQuantCodec(Codec):
    """Blockwise absmax quantization: each block of `block_size` elements (in flat order) gets
    scale = absmax / qmax, codes round(x / scale) in [-qmax, qmax].

    The scale is rounded to `scale_dtype` before quantizing, so decoding uses exactly the scale
    that was sent; per element |error| ≤ scale / 2 (fp32 scales). fp16 scales halve their cost
    but flush blocks with absmax below ~1e-5 to zero (error feedback carries them).
    """

    qmax: ClassVar[int]
    bits: ClassVar[int]

    def __init__(self, *, block_size: int = DEFAULT_BLOCK_SIZE, scale_dtype: str = "fp32") -> None:
        if not isinstance(block_size, int) or block_size < 1:
            raise AtollError(f"codec option block_size={block_size!r} must be a positive integer (e.g. 128)")
        self.block_size = block_size
        self.scale_dtype = _float_dtype(scale_dtype, option="scale_dtype", allowed=("fp32", "fp16"))

    def payload_bytes(self, shape: Sequence[int], *, itemsize: int = 4) -> int:
        return blockquant_bytes(
            math.prod(shape), bits=self.bits, block_size=self.block_size, scale_bytes=self.scale_dtype.itemsize
        )

    def _quantize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """int8 codes (n,) and scales (ceil(n / b),) of the flattened `x`."""
        flat = x.detach().reshape(-1).float()
        n, b = flat.numel(), self.block_size
        num_blocks = -(-n // b)
        blocks = torch.nn.functional.pad(flat, (0, num_blocks * b - n)).view(num_blocks, b)
        scales = (blocks.abs().amax(dim=1) / self.qmax).to(self.scale_dtype)
        sent = scales.float()
        safe = torch.where(sent > 0, sent, torch.ones_like(sent))  # all-zero block: codes 0
        codes = torch.round(blocks / safe[:, None]).clamp_(-self.qmax, self.qmax)
        return codes.to(torch.int8).view(-1)[:n], scales

    def _dequantize(self, enc: Encoded, codes: Tensor, scales: Tensor) -> Tensor:
        block = enc.meta.get("block_size", 0)
        if block < 1 or scales.numel() != -(-enc.numel // block):
            raise _malformed(enc, f"{scales.numel()} scales for block_size {block}")
        per_element = scales.float().repeat_interleave(block)[: enc.numel]
        return codes.float() * per_element


class Int8Codec(BlockQuantCodec):
    name = "int8"
    qmax = 127
    bits = 8

    def encode(self, x: Tensor, *, key: str | None = None) -> Encoded:
        codes, scales = self._quantize(x)
        return self._encoded(x, [codes, scales], block_size=self.block_size)

    def _decode(self, enc: Encoded) -> Tensor:
        _expect_count(enc, 2)
        codes, scales = enc.payload
        if codes.dtype != torch.int8 or codes.numel() != enc.numel:
            raise _malformed(enc, f"codes are {codes.dtype} x {codes.numel()}")
        return self._dequantize(enc, codes, scales)


class Int4Codec(BlockQuantCodec):
    """As int8 with codes in [-7, 7]; code + 8 is stored as a nibble, element 2j in the low
    nibble of byte j and element 2j + 1 in the high one."""

    name = "int4"
    qmax = 7
    bits = 4

    def encode(self, x: Tensor, *, key: str | None = None) -> Encoded:
        codes, scales = self._quantize(x)
        nibbles = (codes.to(torch.int16) + 8).to(torch.uint8)
        if nibbles.numel() % 2:
            nibbles = torch.cat([nibbles, nibbles.new_full((1,), 8)])
        pairs = nibbles.view(-1, 2)
        packed = pairs[:, 0] | (pairs[:, 1] << 4)
        return self._encoded(x, [packed, scales], block_size=self.block_size)

    def _decode(self, enc: Encoded) -> Tensor:
        _expect_count(enc, 2)
        packed, scales = enc.payload
        if packed.dtype != torch.uint8 or packed.numel() != -(-enc.numel // 2):
            raise _malformed(enc, f"packed codes are {packed.dtype} x {packed.numel()}")
        nibbles = torch.stack([packed & 0xF, packed >> 4], dim=1).view(-1)[: enc.numel]
        codes = nibbles.to(torch.int16) - 8
        return self._dequantize(enc, codes, scales)


_INDEX_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
"""Index dtype by its width in bytes (`codec_specs.index_bytes` picks the width)."""


class TopKCodec(Codec):
    """Keep the k = clamp(round(fraction · n), 1, n) entries of largest magnitude.

    Indices go in ascending order, as uint8/int16/int32 (the smallest that fits n, with
    `compact_indices`) or always int32; values in `value_dtype`. Ties in magnitude are broken
    by `torch.topk`, deterministically for a given device.
    """

    name = "topk"

    def __init__(
        self, *, fraction: float = DEFAULT_TOPK_FRACTION, value_dtype: str = "fp32", compact_indices: bool = True
    ) -> None:
        if not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
            raise AtollError(f"codec option fraction={fraction!r} must be in (0, 1], e.g. 0.01 for 1%")
        self.fraction = float(fraction)
        self.value_dtype = _float_dtype(value_dtype, option="value_dtype", allowed=("fp32", "fp16", "bf16"))
        self.compact_indices = bool(compact_indices)

    def num_kept(self, n: int) -> int:
        """How many of `n` elements are sent."""
        return topk_kept(n, self.fraction)

    def payload_bytes(self, shape: Sequence[int], *, itemsize: int = 4) -> int:
        return topk_bytes(
            math.prod(shape),
            fraction=self.fraction,
            value_bytes=self.value_dtype.itemsize,
            compact_indices=self.compact_indices,
        )

    def encode(self, x: Tensor, *, key: str | None = None) -> Encoded:
        flat = x.detach().reshape(-1).float()
        n = flat.numel()
        picked = torch.topk(flat.abs(), self.num_kept(n), sorted=False).indices.sort().values
        values = flat[picked]
        if self.value_dtype == torch.float16:
            values = values.clamp(-_FP16_MAX, _FP16_MAX)
        indices = picked.to(_INDEX_DTYPES[index_bytes(n, compact=self.compact_indices)])
        return self._encoded(x, [indices, values.to(self.value_dtype)])

    def _decode(self, enc: Encoded) -> Tensor:
        _expect_count(enc, 2)
        indices, values = enc.payload
        if indices.numel() != values.numel() or indices.dtype.is_floating_point:
            raise _malformed(enc, f"{indices.numel()} indices ({indices.dtype}) for {values.numel()} values")
        index = indices.long()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= enc.numel):
            raise _malformed(enc, "an index is out of range")
        out = torch.zeros(enc.numel, dtype=torch.float32, device=values.device)
        out[index] = values.float()
        return out


class LowRankCodec(Codec):
    """PowerSGD-style rank-r approximation with one power iteration per round.

    x is viewed as a matrix M of (m, c) = (shape[0], numel / shape[0]). From the previous
    round's Q (warm start, kept per `key`; random the first time): P = M Q, orthonormalize P
    (reduced QR), Q = Mᵀ P; x ≈ P Qᵀ. Both P and Q are sent, in `value_dtype`. Tensors where
    this would not save bytes (1-D ones, or r · (m + c) ≥ m · c) are sent as they are, losslessly.
    Without a `key` every call starts from a fresh random Q (seeded, so deterministic).
    """

    name = "lowrank"

    def __init__(self, *, rank: int = DEFAULT_LOWRANK_RANK, value_dtype: str = "fp32", seed: int = 0) -> None:
        if not isinstance(rank, int) or rank < 1:
            raise AtollError(f"codec option rank={rank!r} must be a positive integer (e.g. 4)")
        self.rank = rank
        self.value_dtype = _float_dtype(value_dtype, option="value_dtype", allowed=("fp32", "fp16", "bf16"))
        self.seed = int(seed)
        self._warm: dict[str, Tensor] = {}

    def payload_bytes(self, shape: Sequence[int], *, itemsize: int = 4) -> int:
        return lowrank_bytes(shape, rank=self.rank, value_bytes=self.value_dtype.itemsize, itemsize=itemsize)

    def encode(self, x: Tensor, *, key: str | None = None) -> Encoded:
        factored = lowrank_factored(tuple(x.shape), self.rank)
        if factored is None:
            return self._encoded(x, [x.detach().reshape(-1).clone()], rank=0)
        rows, cols = factored
        r = self.rank
        matrix = x.detach().reshape(rows, cols).float()
        q = self._start(key, cols, matrix.device)
        p, _ = torch.linalg.qr(matrix @ q)  # (m, r), orthonormal columns even if rank-deficient
        q = matrix.T @ p  # (c, r)
        if key is not None:
            self._warm[key] = q
        return self._encoded(x, [p.to(self.value_dtype), q.to(self.value_dtype)], rank=r)

    def _start(self, key: str | None, cols: int, device: torch.device) -> Tensor:
        q = self._warm.get(key) if key is not None else None
        # A zero column (M was 0 last round) would stay zero forever: restart from random.
        if q is not None and q.shape == (cols, self.rank) and bool((q.norm(dim=0) > 0).all()):
            return q.to(device)
        generator = torch.Generator().manual_seed(self.seed + zlib.crc32((key or "").encode()))
        return torch.randn(cols, self.rank, generator=generator).to(device)

    def _decode(self, enc: Encoded) -> Tensor:
        r = enc.meta.get("rank", 0)
        if r == 0:  # sent as is
            _expect_numels(enc, [enc.numel])
            return enc.payload[0].clone()
        _expect_count(enc, 2)
        p, q = enc.payload
        rows = enc.shape[0] if enc.shape else 0
        cols = enc.numel // rows if rows else 0
        if tuple(p.shape) != (rows, r) or tuple(q.shape) != (cols, r):
            raise _malformed(enc, f"factors {list(p.shape)} and {list(q.shape)} for rank {r}")
        return p.float() @ q.float().T

    def state_dict(self) -> dict[str, Any]:
        """The warm-start Q per key."""
        return {"warm": {k: v.clone() for k, v in self._warm.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._warm = {k: v.clone() for k, v in state.get("warm", {}).items()}


def _expect_count(enc: Encoded, count: int) -> None:
    if len(enc.payload) != count:
        raise _malformed(enc, f"{len(enc.payload)} payload tensors, expected {count}")


def _expect_numels(enc: Encoded, numels: list[int]) -> None:
    _expect_count(enc, len(numels))
    got = [t.numel() for t in enc.payload]
    if got != numels:
        raise _malformed(enc, f"payload sizes {got}, expected {numels}")


_CODECS: dict[str, type[Codec]] = {
    cls.name: cls for cls in (NoneCodec, Fp16Codec, Bf16Codec, Int8Codec, Int4Codec, TopKCodec, LowRankCodec)
}
assert tuple(_CODECS) == CODEC_NAMES, "every codec in codec_specs has one class here, in the same order"


def _option_names(cls: type[Codec]) -> list[str]:
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def get_codec(name: str, **options: Any) -> Codec:
    """A new codec instance by name (`CODEC_NAMES`), with its options as keywords.

    Options: int8/int4 `block_size` (128), `scale_dtype` ("fp32" | "fp16"); topk `fraction`
    (0.01), `value_dtype` ("fp32" | "fp16" | "bf16"), `compact_indices` (True); lowrank `rank`
    (4), `value_dtype`, `seed` (0); none/fp16/bf16 take none. Raises `AtollError` naming the
    valid codecs or options when `name` or an option is unknown, or a value is out of range.
    """
    cls = _CODECS.get(name)
    if cls is None:
        raise AtollError(f"unknown codec {name!r}; valid codecs: {', '.join(CODEC_NAMES)}")
    valid = _option_names(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        hint = f"valid options: {', '.join(valid)}" if valid else "it takes no options"
        raise AtollError(f"codec {name!r} has no option {unknown[0]!r}; {hint}")
    return cls(**options)


def codec_from_config(cfg: SyncSection) -> Codec:
    """A new codec for a run's `sync` section: `cfg.codec` with the keys of `cfg` that apply to it
    (`codec_specs.CODEC_SYNC_KEYS`). Raises `AtollError` as `get_codec` does."""
    options = {SYNC_KEY_OPTIONS[key]: getattr(cfg, key) for key in CODEC_SYNC_KEYS[cfg.codec]}
    return get_codec(cfg.codec, **options)


def decode(enc: Encoded) -> Tensor:
    """Decode any `Encoded` by its codec name (decoding needs no codec options or state).

    Raises `AtollError` for an unknown codec name or a malformed payload.
    """
    cls = _CODECS.get(enc.codec)
    if cls is None:
        raise AtollError(f"payload names unknown codec {enc.codec!r}; valid codecs: {', '.join(CODEC_NAMES)}")
    return cls().decode(enc)


class ErrorFeedback:
    """Wraps a codec so that what compression drops is sent later instead of lost.

    Per key, encodes c = x + residual and keeps residual = c − decode(encoding), in float32 on
    x's device; over many rounds the sum of decoded outputs stays within one residual of the sum
    of inputs. Lossless codecs pass through. Called by the engine once per tensor per sync, keyed
    by parameter name; not thread-safe. The residuals belong in the checkpoint (`state_dict`).
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self._residuals: dict[str, Tensor] = {}

    @property
    def name(self) -> str:
        return self.codec.name

    def encode(self, x: Tensor, *, key: str) -> Encoded:
        """Encode `x` plus the residual carried for `key`; raises `AtollError` if `key` was
        used before for a tensor of another shape."""
        if self.codec.lossless:
            return self.codec.encode(x, key=key)
        corrected = x.detach().float()
        residual = self._residuals.get(key)
        if residual is not None:
            if residual.shape != x.shape:
                raise AtollError(
                    f"error-feedback key {key!r} held shape {list(residual.shape)}, got {list(x.shape)}; "
                    "use one key per tensor"
                )
            corrected = corrected + residual.to(corrected.device)
        enc = replace(self.codec.encode(corrected, key=key), dtype=x.dtype)
        self._residuals[key] = corrected - self.codec.decode(enc).float()
        return enc

    def decode(self, enc: Encoded) -> Tensor:
        """Decode with the wrapped codec (residuals play no part in decoding)."""
        return self.codec.decode(enc)

    def residual(self, key: str) -> Tensor | None:
        """The residual carried for `key` (None before its first lossy encode)."""
        return self._residuals.get(key)

    def reset(self, keys: Sequence[str] | None = None) -> None:
        """Drop the residuals of `keys` (all by default), e.g. after a site heals from a peer."""
        for key in list(self._residuals) if keys is None else keys:
            self._residuals.pop(key, None)

    def snapshot(self, keys: Sequence[str]) -> dict[str, Any]:
        """The state encoding `keys` changes (residuals, the codec's warm start), for `restore`
        after a failed exchange: the failed update is then carried once, by the anchor."""
        return {"residuals": {k: self._residuals.get(k) for k in keys}, "codec": self.codec.state_dict()}

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Put back what `snapshot` saved (encode replaces residuals, never edits them in place)."""
        self.reset(list(snapshot["residuals"]))
        self._residuals.update({k: r for k, r in snapshot["residuals"].items() if r is not None})
        self.codec.load_state_dict(snapshot["codec"])

    def state_dict(self) -> dict[str, Any]:
        return {
            "residuals": {k: v.clone() for k, v in self._residuals.items()},
            "codec": self.codec.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._residuals = {k: v.clone() for k, v in state["residuals"].items()}
        self.codec.load_state_dict(state["codec"])


# Byte buffers: one uint8 tensor per site and sync, native byte order (little-endian everywhere).


def _as_bytes(t: Tensor) -> Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _from_bytes(buf: Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    nbytes = math.prod(shape) * dtype.itemsize
    # clone: a fresh, aligned tensor (a view at an odd offset cannot be reinterpreted as fp32)
    return buf[offset : offset + nbytes].clone().view(dtype).reshape(shape)


def _check_buffer(buf: Tensor) -> None:
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise AtollError(f"expected a 1-D uint8 buffer, got {buf.dtype} of shape {list(buf.shape)}")


def pack_payload(encoded: Sequence[Encoded]) -> Tensor:
    """The payloads' bytes back to back and nothing else: exactly Σ `num_bytes` bytes.

    For a receiver that knows the layout (every site encodes the same tensors with the same
    codec, so its own encodings are the template; see `unpack_payload`). On the device of the
    first payload tensor (CPU when there is none).
    """
    parts = [_as_bytes(t) for enc in encoded for t in enc.payload]
    if not parts:
        return torch.empty(0, dtype=torch.uint8)
    return torch.cat([p.to(parts[0].device) for p in parts])


def unpack_payload(buf: Tensor, *, like: Sequence[Encoded]) -> list[Encoded]:
    """Split a peer's `pack_payload` bytes with the layout of `like`, this site's own encodings
    of the same tensors with the same codec options (payload layouts depend only on those).

    Raises `AtollError` if the length does not match that layout.
    """
    _check_buffer(buf)
    expected = sum(enc.num_bytes for enc in like)
    if buf.numel() != expected:
        raise AtollError(
            f"received {buf.numel()} payload bytes, this site's layout has {expected}; "
            "every site must use the same codec options and parameter layout"
        )
    out, offset = [], 0
    for enc in like:
        payload = []
        for t in enc.payload:
            payload.append(_from_bytes(buf, offset, t.dtype, tuple(t.shape)))
            offset += t.nbytes
        out.append(replace(enc, payload=payload, meta=dict(enc.meta)))
    return out
