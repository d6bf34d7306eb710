"""The HTTP API in-process: bounds and 4xx JSON errors, SSE, API key, queue, concurrent jobs."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from atoll.model import ModelConfig, Transformer
from atoll.rundir.tokenizer import load_text_tokenizer
from atoll.serve.api import Limits, create_app
from atoll.serve.engine import Choice, Engine, EngineBusy, Job
from atoll.serve.textgen import SamplingParams, complete


@pytest.fixture(scope="module")
def engine(tiny_data: Path) -> Iterator[Engine]:
    tokenizer = load_text_tokenizer(tiny_data)
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            vocab_size=tokenizer.vocab_size,
            dim=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            ffn_dim=128,
            max_seq_len=128,
        )
    ).eval()
    eng = Engine(model, tokenizer, max_queue=8)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def client(engine: Engine) -> Iterator[TestClient]:
    app = create_app(
        engine,
        model_name="tiny",
        limits=Limits(max_prompt_tokens=80, max_tokens=20, max_choices=3, max_body_bytes=4096),
        api_key="sekrit",
    )
    with TestClient(app, headers={"Authorization": "Bearer sekrit"}) as c:
        yield c


def greedy(engine: Engine, prompt: str, n: int) -> str:
    return complete(
        engine.model,
        engine.tokenizer,
        engine.tokenizer.encode(prompt),
        SamplingParams(max_new_tokens=n, temperature=0.0),
    ).text()


def test_models_and_health(client: TestClient) -> None:
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert client.get("/health").json()["status"] == "ok"


def test_completion_is_the_greedy_text_with_usage(client: TestClient, engine: Engine) -> None:
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "the site", "max_tokens": 8, "temperature": 0})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == greedy(engine, "the site", 8)
    assert body["usage"]["prompt_tokens"] == len(engine.tokenizer.encode("the site"))
    echo = client.post(
        "/v1/completions", json={"prompt": "the site", "max_tokens": 8, "temperature": 0, "echo": True}
    ).json()
    assert echo["choices"][0]["text"] == "the site" + body["choices"][0]["text"]


def _sse(client: TestClient, url: str, payload: dict[str, object]) -> list[dict[str, object]]:
    with client.stream("POST", url, json=payload) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_streaming_gives_the_same_text_as_a_single_answer(client: TestClient, engine: Engine) -> None:
    chunks = _sse(
        client,
        "/v1/completions",
        {
            "prompt": "the site",
            "max_tokens": 8,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])  # type: ignore[index]
    assert text == greedy(engine, "the site", 8)
    assert chunks[-1]["usage"]["completion_tokens"] >= 1  # type: ignore[index]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-1] in ("stop", "length")  # type: ignore[index]


def test_chat_streams_role_then_content(client: TestClient, engine: Engine) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chunks = _sse(
        client, "/v1/chat/completions", {"messages": messages, "max_tokens": 6, "temperature": 0, "stream": True}
    )
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}  # type: ignore[index]
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)  # type: ignore[index,union-attr]
    whole = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 6, "temperature": 0}).json()
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": streamed}
    prompt = engine.tokenizer.render_chat(messages)
    assert streamed == greedy(engine, prompt, 6)


def test_several_choices_are_seeded_and_reproducible(client: TestClient) -> None:
    payload = {"prompt": "the", "max_tokens": 10, "n": 3, "seed": 7, "temperature": 1.0}
    first = [c["text"] for c in client.post("/v1/completions", json=payload).json()["choices"]]
    again = [c["text"] for c in client.post("/v1/completions", json=payload).json()["choices"]]
    assert first == again and len(set(first)) > 1


@pytest.mark.parametrize(
    ("payload", "status", "param"),
    [
        ({"prompt": "the", "n": 4}, 400, "n"),
        ({"prompt": ["a", "b"], "n": 2}, 400, "n"),
        ({"prompt": "the", "max_tokens": 21}, 400, "max_tokens"),
        ({"prompt": "the site " * 60}, 400, "prompt"),
        ({"prompt": "the", "temperature": 3}, 400, "temperature"),
        ({"prompt": 5}, 400, "prompt.str"),
        ({"max_tokens": 3}, 400, "prompt"),
        ({"prompt": "the", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"prompt": "the", "model": "gpt-4"}, 404, "model"),
        ({"prompt": "the", "logprobs": 2}, 400, "logprobs"),
    ],
)
def test_bad_requests_get_4xx_with_an_openai_error_body(
    client: TestClient, payload: dict[str, object], status: int, param: str
) -> None:
    r = client.post("/v1/completions", json=payload)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"


def test_malformed_body_size_route_and_key(client: TestClient) -> None:
    r = client.post("/v1/completions", content=b'{"prompt": "x",', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = client.post("/v1/completions", content=json.dumps({"prompt": "x" * 5000}).encode())
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = client.post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/health", headers={"Authorization": ""}).status_code == 200  # health needs no key


def test_full_queue_answers_429(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    def busy(job: Job) -> None:
        raise EngineBusy

    app = create_app(engine, model_name="tiny")
    monkeypatch.setattr(engine, "submit", busy)
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"prompt": "the"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"


def test_concurrent_jobs_each_get_exactly_their_own_text(engine: Engine) -> None:
    prompts = ["the site", "a model", "the data center", "river stone", "king queen", "light night"]
    expected = {p: greedy(engine, p, 10) for p in prompts}
    results: dict[str, str] = {}
    done = threading.Barrier(len(prompts) + 1)

    def client_thread(prompt: str) -> None:
        pieces: list[str] = []
        finished = threading.Event()

        def emit(event: tuple[object, ...]) -> None:
            if event[0] == "delta":
                pieces.append(str(event[2]))
            elif event[0] == "end":
                finished.set()

        engine.submit(
            Job([Choice(0, engine.tokenizer.encode(prompt), SamplingParams(max_new_tokens=10, temperature=0.0))], emit)
        )
        assert finished.wait(60)
        results[prompt] = "".join(pieces)
        done.wait()

    threads = [threading.Thread(target=client_thread, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    done.wait(timeout=120)
    for t in threads:
        t.join()
    assert results == expected


@pytest.mark.parametrize(
    ("url", "body", "field"),
    [
        ("/v1/completions", '{"prompt": "\\ud800", "max_tokens": 2}', "prompt"),
        ("/v1/completions", '{"prompt": ["ok", "a\\udfffb"], "max_tokens": 2}', "prompt.1"),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud83d"}]}', "messages.0.content"),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_the_field(client: TestClient, url: str, body: str, field: str) -> None:
    r = client.post(url, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == field and "surrogate" in error["message"]
    paired = client.post(url.replace("chat/", ""), content='{"prompt": "\\ud83d\\ude00", "max_tokens": 2}')
    assert paired.status_code == 200  # a surrogate pair is an ordinary character
