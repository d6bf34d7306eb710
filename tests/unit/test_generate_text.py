"""Text generation: KV-cached decoding equals uncached, text streaming, stop strings, finish reasons."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from atoll.errors import AtollError
from atoll.model import ModelConfig, Transformer, generate
from atoll.rundir.tokenizer import TextTokenizer, load_text_tokenizer
from atoll.serve.textgen import SamplingParams, TextStream, complete, encode_prompt


@pytest.fixture(scope="module")
def tokenizer(tiny_data: Path) -> TextTokenizer:
    return load_text_tokenizer(tiny_data)


@pytest.fixture(scope="module")
def model(tokenizer: TextTokenizer) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=128, max_seq_len=96
    )
    return Transformer(cfg).eval()


def test_atoll_text_tokenizer_prepends_the_document_separator(tokenizer: TextTokenizer) -> None:
    assert tokenizer.bos_id == tokenizer.eos_id == 0 and tokenizer.pad_id == 1
    ids = tokenizer.encode("the site link")
    assert ids[0] == 0 and tokenizer.decode(ids) == "the site link"
    assert encode_prompt(tokenizer, "", max_tokens=4) == [0]
    with pytest.raises(AtollError, match="at most 2"):
        encode_prompt(tokenizer, "the site link model token", max_tokens=2)


@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": 0.0},
        {"temperature": 1.0, "top_k": 20, "seed": 5},
        {"temperature": 0.9, "top_p": 0.8, "repetition_penalty": 1.3, "seed": 2},
    ],
)
def test_cached_and_uncached_decoding_give_the_same_tokens(
    model: Transformer, tokenizer: TextTokenizer, settings: dict[str, object]
) -> None:
    prompt = tokenizer.encode("The network trains a model")
    cached = list(generate(model, prompt, max_new_tokens=30, use_cache=True, **settings))  # type: ignore[arg-type]
    uncached = list(generate(model, prompt, max_new_tokens=30, use_cache=False, **settings))  # type: ignore[arg-type]
    assert len(cached) == 30 and cached == uncached


def _ids(tokenizer: TextTokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_bos=False)


def test_stream_holds_back_a_possible_stop_string_and_never_emits_it(tokenizer: TextTokenizer) -> None:
    stream = TextStream(tokenizer, stop=["STOP"])
    pieces = [stream.push(t) for t in _ids(tokenizer, "the site ST")]
    assert "".join(pieces) == "the site "  # "ST" may begin "STOP": held back
    rest = [stream.push(t) for t in _ids(tokenizer, "OP and more")]
    assert "".join(pieces + rest) == "the site " and stream.stopped
    assert stream.push(5) == "" and stream.flush() == ""


def test_stream_releases_held_text_that_turned_out_not_to_stop(tokenizer: TextTokenizer) -> None:
    stream = TextStream(tokenizer, stop=["STOP"])
    out = "".join(stream.push(t) for t in _ids(tokenizer, "the ST and the S"))
    assert out == "the ST and the "
    assert out + stream.flush() == "the ST and the S"


def test_stream_waits_for_the_rest_of_a_multibyte_character(tokenizer: TextTokenizer) -> None:
    ids = _ids(tokenizer, "é!")  # not in the tiny vocabulary: two byte tokens for é
    stream = TextStream(tokenizer)
    assert len(ids) >= 3 and stream.push(ids[0]) == ""
    assert "".join(stream.push(t) for t in ids[1:]) == "é!"


def test_complete_matches_generate_and_reports_finish_reasons(model: Transformer, tokenizer: TextTokenizer) -> None:
    prompt = tokenizer.encode("The data center")
    tokens = list(generate(model, prompt, max_new_tokens=12, temperature=0.0, stop_token_ids=tokenizer.eos_ids))
    done = complete(model, tokenizer, prompt, SamplingParams(max_new_tokens=12, temperature=0.0))
    text = done.text()
    assert text == tokenizer.decode(tokens) and done.num_tokens == len(tokens)
    assert done.finish_reason == ("stop" if tokens[-1] in tokenizer.eos_ids else "length")
    # a stop string inside the greedy text cuts it there
    cut = text[len(text) // 2 : len(text) // 2 + 3]
    stopped = complete(model, tokenizer, prompt, SamplingParams(max_new_tokens=12, temperature=0.0, stop=(cut,)))
    assert stopped.text() == text[: text.index(cut)] and stopped.finish_reason == "stop"


def test_generation_stops_at_the_end_of_text_token(model: Transformer, tokenizer: TextTokenizer) -> None:
    biased = Transformer(model.cfg).eval()
    biased.load_state_dict(model.state_dict())
    with torch.no_grad():
        biased.norm.weight.zero_()  # every logit 0 ...
        assert biased.lm_head is not None
        biased.lm_head.weight[tokenizer.eos_id].fill_(0.0)
    # ... except that greedy argmax on ties picks the lowest id: the end-of-text token (0)
    done = complete(biased, tokenizer, tokenizer.encode("x"), SamplingParams(max_new_tokens=5, temperature=0.0))
    assert done.text() == "" and done.finish_reason == "stop" and done.num_tokens == 1


def test_cancel_stops_between_tokens(model: Transformer, tokenizer: TextTokenizer) -> None:
    calls = []
    done = complete(
        model,
        tokenizer,
        tokenizer.encode("The"),
        SamplingParams(max_new_tokens=20, temperature=0.0),
        cancelled=lambda: calls.append(1) or len(calls) >= 3,
    )
    done.text()
    assert done.num_tokens == 3 and done.finish_reason == "cancelled"
