"""Text generation: KV-cached decoding equals uncached, text streaming, stop strings, finish reasons."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from atoll.errors import AtollError
from atoll.finetune.text import TextCodec, load_text_codec
from atoll.model import ModelConfig, Transformer, generate
from atoll.serve.textgen import SamplingParams, TextStream, complete, encode_prompt


@pytest.fixture(scope="module")
def codec(tiny_data: Path) -> TextCodec:
    return load_text_codec(tiny_data)


@pytest.fixture(scope="module")
def model(codec: TextCodec) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=codec.vocab_size, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=128, max_seq_len=96)
    return Transformer(cfg).eval()


def test_atoll_tokenizer_codec_prepends_the_document_separator(codec: TextCodec) -> None:
    assert codec.bos_id == codec.eos_id == 0 and codec.pad_id == 1
    ids = codec.encode("the site link")
    assert ids[0] == 0 and codec.decode(ids) == "the site link"
    assert encode_prompt(codec, "", max_tokens=4) == [0]
    with pytest.raises(AtollError, match="at most 2"):
        encode_prompt(codec, "the site link model token", max_tokens=2)


@pytest.mark.parametrize("settings", [{"temperature": 0.0}, {"temperature": 1.0, "top_k": 20, "seed": 5}, {"temperature": 0.9, "top_p": 0.8, "repetition_penalty": 1.3, "seed": 2}])
def test_cached_and_uncached_decoding_give_the_same_tokens(model: Transformer, codec: TextCodec, settings: dict[str, object]) -> None:
    prompt = codec.encode("The network trains a model")
    cached = list(generate(model, prompt, max_new_tokens=30, use_cache=True, **settings))  # type: ignore[arg-type]
    uncached = list(generate(model, prompt, max_new_tokens=30, use_cache=False, **settings))  # type: ignore[arg-type]
    assert len(cached) == 30 and cached == uncached


def _ids(codec: TextCodec, text: str) -> list[int]:
    return codec.encode(text, add_bos=False)


def test_stream_holds_back_a_possible_stop_string_and_never_emits_it(codec: TextCodec) -> None:
    stream = TextStream(codec, stop=["STOP"])
    pieces = [stream.push(t) for t in _ids(codec, "the site ST")]
    assert "".join(pieces) == "the site "  # "ST" may begin "STOP": held back
    rest = [stream.push(t) for t in _ids(codec, "OP and more")]
    assert "".join(pieces + rest) == "the site " and stream.stopped
    assert stream.push(5) == "" and stream.flush() == ""


def test_stream_releases_held_text_that_turned_out_not_to_stop(codec: TextCodec) -> None:
    stream = TextStream(codec, stop=["STOP"])
    out = "".join(stream.push(t) for t in _ids(codec, "the ST and the S"))
    assert out == "the ST and the "
    assert out + stream.flush() == "the ST and the S"


def test_stream_waits_for_the_rest_of_a_multibyte_character(codec: TextCodec) -> None:
    ids = _ids(codec, "é!")  # not in the tiny vocabulary: two byte tokens for é
    stream = TextStream(codec)
    assert len(ids) >= 3 and stream.push(ids[0]) == ""
    assert "".join(stream.push(t) for t in ids[1:]) == "é!"


def test_complete_matches_generate_and_reports_finish_reasons(model: Transformer, codec: TextCodec) -> None:
    prompt = codec.encode("The data center")
    tokens = list(generate(model, prompt, max_new_tokens=12, temperature=0.0, stop_token_ids=codec.eos_ids))
    done = complete(model, codec, prompt, SamplingParams(max_new_tokens=12, temperature=0.0))
    text = done.text()
    assert text == codec.decode(tokens) and done.num_tokens == len(tokens)
    assert done.finish_reason == ("stop" if tokens[-1] in codec.eos_ids else "length")
    # a stop string inside the greedy text cuts it there
    cut = text[len(text) // 2 : len(text) // 2 + 3]
    stopped = complete(model, codec, prompt, SamplingParams(max_new_tokens=12, temperature=0.0, stop=(cut,)))
    assert stopped.text() == text[: text.index(cut)] and stopped.finish_reason == "stop"


def test_generation_stops_at_the_end_of_text_token(model: Transformer, codec: TextCodec) -> None:
    biased = Transformer(model.cfg).eval()
    biased.load_state_dict(model.state_dict())
    with torch.no_grad():
        biased.norm.weight.zero_()  # every logit 0 ...
        assert biased.lm_head is not None
        biased.lm_head.weight[codec.eos_id].fill_(0.0)
    # ... except that greedy argmax on ties picks the lowest id: the end-of-text token (0)
    done = complete(biased, codec, codec.encode("x"), SamplingParams(max_new_tokens=5, temperature=0.0))
    assert done.text() == "" and done.finish_reason == "stop" and done.num_tokens == 1


def test_cancel_stops_between_tokens(model: Transformer, codec: TextCodec) -> None:
    calls = []
    done = complete(model, codec, codec.encode("The"), SamplingParams(max_new_tokens=20, temperature=0.0), cancelled=lambda: calls.append(1) or len(calls) >= 3)
    done.text()
    assert done.num_tokens == 3 and done.finish_reason == "cancelled"
