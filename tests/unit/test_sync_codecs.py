import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from atoll.config.schema import SyncSection
from atoll.errors import AtollError
from atoll.sync import codec_specs
from atoll.sync.codecs import (
    CODEC_NAMES,
    Encoded,
    ErrorFeedback,
    codec_from_config,
    decode,
    get_codec,
    pack_payload,
    unpack_payload,
)
from atoll.sync.envelope import ENVELOPE_BYTES, Header, Sealer


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_none_is_exact_and_does_not_alias(dtype: torch.dtype) -> None:
    codec = get_codec("none")
    x = rand(5, 7).to(dtype)
    enc = codec.encode(x)
    assert enc.num_bytes == x.numel() * x.element_size()
    y = codec.decode(enc)
    assert torch.equal(y, x) and y.dtype == dtype and y.shape == x.shape
    x.add_(1)
    assert not torch.equal(codec.decode(enc), x)


def test_fp16_and_bf16_relative_error() -> None:
    x = rand(1000) * 10
    for name, rel in (("fp16", 2**-11), ("bf16", 2**-8)):
        codec = get_codec(name)
        enc = codec.encode(x)
        assert enc.num_bytes == 2 * x.numel()
        y = codec.decode(enc)
        assert y.dtype == torch.float32
        assert torch.all((y - x).abs() <= rel * x.abs() + 2**-24)


def test_fp16_saturates_instead_of_inf() -> None:
    y = decode(get_codec("fp16").encode(torch.tensor([1e6, -1e6, 1.0])))
    assert y.tolist() == [65504.0, -65504.0, 1.0]


def block_errors(x: torch.Tensor, y: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block: max |error| and absmax of the input."""
    n = x.numel()
    pad = -n % block
    xb = torch.nn.functional.pad(x.reshape(-1), (0, pad)).view(-1, block)
    eb = torch.nn.functional.pad((y - x).reshape(-1), (0, pad)).view(-1, block)
    return eb.abs().amax(dim=1), xb.abs().amax(dim=1)


@pytest.mark.parametrize("name,qmax", [("int8", 127), ("int4", 7)])
@pytest.mark.parametrize("block", [128, 64, 100])
def test_blockwise_quant_error_bound(name: str, qmax: int, block: int) -> None:
    x = rand(37, 29) * torch.logspace(-3, 1, 29)  # blocks of very different magnitudes
    codec = get_codec(name, block_size=block)
    y = codec.decode(codec.encode(x))
    assert y.shape == x.shape and y.dtype == x.dtype
    err, absmax = block_errors(x, y, block)
    assert torch.all(err <= absmax / (2 * qmax) * (1 + 1e-5))


@pytest.mark.parametrize("name,qmax", [("int8", 127), ("int4", 7)])
def test_fp16_scales_stay_within_a_step(name: str, qmax: int) -> None:
    x = rand(3000)
    codec = get_codec(name, block_size=128, scale_dtype="fp16")
    enc = codec.encode(x)
    assert enc.payload[1].dtype == torch.float16
    err, absmax = block_errors(x, codec.decode(enc), 128)
    assert torch.all(err <= absmax / qmax)


def test_zero_blocks_decode_to_zero() -> None:
    x = torch.zeros(300)
    x[200:] = rand(100)
    for name in ("int8", "int4"):
        y = decode(get_codec(name, block_size=100).encode(x))
        assert torch.equal(y[:200], torch.zeros(200))


def test_int4_packs_two_nibbles_per_byte() -> None:
    # absmax 7 → scale 1: codes are the values themselves, stored as code + 8.
    x = torch.tensor([7.0, -7.0, 0.0, 3.0, -1.0])
    enc = get_codec("int4", block_size=8).encode(x)
    packed, scales = enc.payload
    assert packed.tolist() == [15 | (1 << 4), 8 | (11 << 4), 7 | (8 << 4)]  # odd n: pad code 8
    assert scales.tolist() == [1.0]
    assert torch.equal(decode(enc), x)


@pytest.mark.parametrize(
    "name,options,formula",
    [
        ("none", {}, lambda n: 4 * n),
        ("fp16", {}, lambda n: 2 * n),
        ("bf16", {}, lambda n: 2 * n),
        ("int8", {"block_size": 128}, lambda n: n + 4 * math.ceil(n / 128)),
        ("int8", {"block_size": 64, "scale_dtype": "fp16"}, lambda n: n + 2 * math.ceil(n / 64)),
        ("int4", {"block_size": 128}, lambda n: math.ceil(n / 2) + 4 * math.ceil(n / 128)),
        ("int4", {"block_size": 32, "scale_dtype": "fp16"}, lambda n: math.ceil(n / 2) + 2 * math.ceil(n / 32)),
    ],
)
@pytest.mark.parametrize("n", [1, 127, 1000, 1001])
def test_num_bytes_formula_is_the_payload_size(
    name: str, options: dict[str, Any], formula: Callable[[int], int], n: int
) -> None:
    enc = get_codec(name, **options).encode(rand(n))
    assert enc.num_bytes == formula(n)
    assert enc.num_bytes == sum(t.numel() * t.element_size() for t in enc.payload)
    assert pack_payload([enc]).numel() == enc.num_bytes


def test_topk_keeps_exactly_the_k_largest() -> None:
    n = 1000
    x = (torch.randperm(n).float() + 1) * torch.where(torch.rand(n) < 0.5, -1.0, 1.0)  # distinct |x|
    codec = get_codec("topk", fraction=0.01)
    enc = codec.encode(x.view(20, 50))
    y = codec.decode(enc).view(-1)
    k = 10
    expected = set(x.abs().argsort(descending=True)[:k].tolist())
    assert set(y.nonzero().view(-1).tolist()) == expected
    kept = torch.tensor(sorted(expected))
    assert torch.equal(y[kept], x[kept])
    indices, values = enc.payload
    assert indices.dtype == torch.int16 and values.dtype == torch.float32
    assert enc.num_bytes == k * (2 + 4)


@pytest.mark.parametrize(
    "n,compact,dtype",
    [(200, True, torch.uint8), (256, True, torch.uint8), (1000, True, torch.int16),
     (40000, True, torch.int32), (200, False, torch.int32)],
)  # fmt: skip
def test_topk_index_width(n: int, compact: bool, dtype: torch.dtype) -> None:
    codec = get_codec("topk", fraction=0.05, compact_indices=compact, value_dtype="fp16")
    enc = codec.encode(rand(n))
    k = round(0.05 * n)
    assert enc.payload[0].dtype == dtype and enc.payload[1].dtype == torch.float16
    assert enc.num_bytes == k * (dtype.itemsize + 2)


def test_topk_k_is_rounded_and_at_least_one() -> None:
    codec = get_codec("topk", fraction=0.07)
    assert [codec.num_kept(n) for n in (0, 1, 10, 100, 1000)] == [0, 1, 1, 7, 70]


@pytest.mark.parametrize("shape", [(40, 50), (16, 4, 3, 3)])
def test_lowrank_is_near_exact_on_a_rank_r_matrix(shape: tuple[int, ...]) -> None:
    rows, cols = shape[0], math.prod(shape[1:])
    x = (rand(rows, 3, seed=1) @ rand(3, cols, seed=2)).view(shape)
    codec = get_codec("lowrank", rank=3)
    enc = codec.encode(x, key="w")
    assert enc.num_bytes == 4 * 3 * (rows + cols)
    y = codec.decode(enc)
    assert y.shape == x.shape
    assert torch.allclose(y, x, atol=1e-4 * x.abs().max().item())


def test_lowrank_sends_1d_and_small_tensors_as_is() -> None:
    codec = get_codec("lowrank", rank=4)
    for x in (rand(100), rand(6, 7)):  # 4 * (6 + 7) >= 42
        enc = codec.encode(x, key="b")
        assert enc.meta["rank"] == 0 and enc.num_bytes == 4 * x.numel()
        assert torch.equal(codec.decode(enc), x)


def test_lowrank_warm_start_converges_to_best_rank_r() -> None:
    u, _ = torch.linalg.qr(rand(60, 60, seed=3))
    v, _ = torch.linalg.qr(rand(80, 60, seed=4))
    sigma = torch.tensor([10.0, 6.0, 3.0] + [0.3 / (i + 1) for i in range(57)])
    x = u @ torch.diag(sigma) @ v.T
    best = sigma[3:].norm().item()
    codec = get_codec("lowrank", rank=3)
    errors = [(codec.decode(codec.encode(x, key="w")) - x).norm().item() for _ in range(15)]
    assert errors[-1] <= best * 1.001 < errors[0]
    assert set(codec.state_dict()["warm"]) == {"w"}


def test_lowrank_zero_matrix_recovers() -> None:
    codec = get_codec("lowrank", rank=2)
    assert torch.equal(codec.decode(codec.encode(torch.zeros(20, 30), key="z")), torch.zeros(20, 30))
    x = rand(20, 2, seed=5) @ rand(2, 30, seed=6)
    assert torch.allclose(codec.decode(codec.encode(x, key="z")), x, atol=1e-4)


@pytest.mark.parametrize(
    "name,options",
    [("fp16", {}), ("int8", {"block_size": 32}), ("int4", {"block_size": 32}),
     ("topk", {"fraction": 0.05}), ("lowrank", {"rank": 2})],
)  # fmt: skip
def test_error_feedback_carries_the_residual(name: str, options: dict[str, Any]) -> None:
    ef = ErrorFeedback(get_codec(name, **options))
    plain = get_codec(name, **options)
    sum_x = torch.zeros(24, 40)
    sum_ef = torch.zeros(24, 40)
    sum_plain = torch.zeros(24, 40)
    bias = rand(24, 40, seed=99)  # a persistent direction that compression alone keeps losing
    for step in range(60):
        x = bias + 0.3 * rand(24, 40, seed=step)
        sum_x += x
        sum_ef += ef.decode(ef.encode(x, key="w"))
        sum_plain += plain.decode(plain.encode(x, key="w"))
        # The invariant: what was sent plus what is still owed equals what came in.
        assert torch.allclose(sum_ef + ef.residual("w"), sum_x, atol=1e-3)
    assert (sum_ef - sum_x).norm() < 0.2 * (sum_plain - sum_x).norm()


def test_error_feedback_lossless_keeps_no_residual_and_dtype_is_kept() -> None:
    ef = ErrorFeedback(get_codec("none"))
    x = rand(10)
    assert torch.equal(ef.decode(ef.encode(x, key="a")), x)
    assert ef.residual("a") is None
    lossy = ErrorFeedback(get_codec("int8"))
    xb = rand(300).to(torch.bfloat16)
    enc = lossy.encode(xb, key="b")
    assert enc.dtype == torch.bfloat16 and lossy.decode(enc).dtype == torch.bfloat16
    assert lossy.residual("b").dtype == torch.float32
    with pytest.raises(AtollError, match="one key per tensor"):
        lossy.encode(rand(20), key="b")


def test_error_feedback_state_dict_resumes_bitwise() -> None:
    a = ErrorFeedback(get_codec("lowrank", rank=2))
    for step in range(3):
        a.encode(rand(30, 20, seed=step), key="w")
    b = ErrorFeedback(get_codec("lowrank", rank=2))
    b.load_state_dict(a.state_dict())
    for step in range(3, 6):
        ea, eb = a.encode(rand(30, 20, seed=step), key="w"), b.encode(rand(30, 20, seed=step), key="w")
        assert all(torch.equal(p, q) for p, q in zip(ea.payload, eb.payload, strict=True))
    a.reset()
    assert a.residual("w") is None


def test_get_codec_errors_list_what_is_valid() -> None:
    with pytest.raises(AtollError, match=r"unknown codec 'int2'.*none, fp16, bf16, int8, int4, topk, lowrank"):
        get_codec("int2")
    with pytest.raises(AtollError, match=r"no option 'blocksize'.*block_size, scale_dtype"):
        get_codec("int8", blocksize=64)
    with pytest.raises(AtollError, match="takes no options"):
        get_codec("fp16", block_size=64)
    for name, options in [
        ("int8", {"block_size": 0}),
        ("int4", {"scale_dtype": "fp8"}),
        ("topk", {"fraction": 0.0}),
        ("topk", {"fraction": 1.5}),
        ("lowrank", {"rank": 0}),
        ("lowrank", {"value_dtype": "int8"}),
    ]:
        with pytest.raises(AtollError, match=next(iter(options))):
            get_codec(name, **options)


def test_decode_refuses_another_codec_and_bad_payloads() -> None:
    enc = get_codec("int8").encode(rand(10))
    with pytest.raises(AtollError, match="same sync codec"):
        get_codec("int4").decode(enc)
    bad = get_codec("topk", fraction=0.5).encode(rand(10))
    bad.payload[0][0] = 100
    with pytest.raises(AtollError, match="out of range"):
        decode(bad)
    with pytest.raises(AtollError, match="payload tensors"):
        decode(Encoded("int8", (10,), torch.float32, [torch.zeros(10, dtype=torch.int8)], {"block_size": 128}))


def all_encodings() -> list[Encoded]:
    out = []
    for name in CODEC_NAMES:
        codec = get_codec(name)
        out.append(codec.encode(rand(33, 70), key="w"))
        out.append(codec.encode(rand(5).to(torch.bfloat16), key="b"))
        out.append(codec.encode(torch.zeros(0), key="e"))
    return out


def assert_same(a: list[Encoded], b: list[Encoded]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x.codec, x.shape, x.dtype, x.meta) == (y.codec, y.shape, y.dtype, y.meta)
        assert len(x.payload) == len(y.payload)
        for p, q in zip(x.payload, y.payload, strict=True):
            assert p.dtype == q.dtype and torch.equal(p, q)
        assert torch.equal(decode(x), decode(y))


def test_pack_payload_round_trip_with_a_template() -> None:
    encs = all_encodings()
    raw = pack_payload(encs)
    assert raw.numel() == sum(e.num_bytes for e in encs)
    assert_same(unpack_payload(raw.clone(), like=encs), encs)
    with pytest.raises(AtollError, match="same codec options"):
        unpack_payload(raw[:-1], like=encs)
    with pytest.raises(AtollError, match="uint8"):
        unpack_payload(raw.float(), like=encs)


def test_payload_round_trips_through_the_envelope() -> None:
    # What production sends: the payload bytes beside a sealed, fixed-size envelope.
    encs = all_encodings()
    raw = pack_payload(encs)
    sealer = Sealer(b"0123456789abcdef0123")
    header = Header("east", "10.0.0.1", 0, 3, 12.5, raw.numel(), bytes(32))
    envelope = sealer.seal(header, raw)
    assert envelope.numel() == ENVELOPE_BYTES
    opened, body = sealer.open(envelope.clone(), raw.clone())
    assert opened == header
    assert_same(unpack_payload(body, like=encs), encs)


@pytest.mark.parametrize(
    "name,options",
    [*((name, {}) for name in CODEC_NAMES),
     ("int8", {"block_size": 64, "scale_dtype": "fp16"}), ("int4", {"block_size": 100}),
     ("topk", {"fraction": 0.05, "value_dtype": "bf16", "compact_indices": False}),
     ("lowrank", {"rank": 3, "value_dtype": "fp16"})],
)  # fmt: skip
def test_payload_bytes_is_what_encode_sends(name: str, options: dict[str, Any]) -> None:
    codec = get_codec(name, **options)
    shapes = [(0,), (1,), (300,), (33, 70), (6, 7), (16, 4, 3, 3), (257, 2), (40000,), (1, 500)]
    for shape in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            enc = codec.encode(rand(*shape).to(dtype), key=str(shape))
            assert codec.payload_bytes(shape, itemsize=dtype.itemsize) == enc.num_bytes, (shape, dtype)


def test_the_planner_table_and_the_codecs_agree_on_defaults() -> None:
    assert get_codec("int8").block_size == codec_specs.DEFAULT_BLOCK_SIZE == SyncSection().block_size
    assert get_codec("topk").fraction == codec_specs.DEFAULT_TOPK_FRACTION == SyncSection().topk_fraction
    assert get_codec("lowrank").rank == codec_specs.DEFAULT_LOWRANK_RANK == SyncSection().rank
    for name in CODEC_NAMES:
        shape = (64, 300)
        assert codec_specs.payload_bytes(name, shape) == get_codec(name).payload_bytes(shape)


def test_codec_from_config_takes_only_the_keys_that_apply() -> None:
    int8 = codec_from_config(SyncSection(codec="int8", block_size=64))
    assert int8.name == "int8" and int8.block_size == 64  # type: ignore[attr-defined]
    topk = codec_from_config(SyncSection(codec="topk", topk_fraction=0.05))
    assert topk.fraction == 0.05  # type: ignore[attr-defined]
    assert codec_from_config(SyncSection(codec="lowrank", rank=7)).rank == 7  # type: ignore[attr-defined]
    # sync.value_dtype: bf16 factors send half the bytes of fp32 ones, and decode to a close tensor.
    half = codec_from_config(SyncSection(codec="lowrank", rank=4, value_dtype="bf16"))
    shape = (64, 300)
    assert 2 * half.payload_bytes(shape) == codec_from_config(SyncSection(codec="lowrank", rank=4)).payload_bytes(shape)
    x = torch.randn(shape)
    enc = half.encode(x)
    assert all(t.dtype == torch.bfloat16 for t in enc.payload)
    assert torch.linalg.norm(decode(enc) - x) < torch.linalg.norm(x)
    assert codec_from_config(SyncSection(codec="topk", value_dtype="fp16")).value_dtype == torch.float16  # type: ignore[attr-defined]
    # Keys for other codecs never reach the codec (built without validation: the schema may refuse them).
    assert codec_from_config(SyncSection.model_construct(codec="fp16", block_size=64, rank=9)).name == "fp16"
