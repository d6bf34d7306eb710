"""`atoll serve` as a real server process, talked to with the official `openai` client."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from atoll.config import RunConfig, load_config
from tests.conftest import REPO, tiny_config

KEY = "test-key-not-secret"


@pytest.fixture(scope="module")
def served_run(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Path:
    import torch

    from atoll.train.trainer import run_training

    tmp = tmp_path_factory.mktemp("serve")
    threads = torch.get_num_threads()
    run_training(
        load_config(RunConfig, tiny_config(tmp, tiny_data, train={"steps": 4, "eval_every": 0, "checkpoint_every": 0}))
    )
    torch.set_num_threads(threads)
    return tmp / "runs" / "t"


@pytest.fixture(scope="module")
def server(served_run: Path) -> Iterator[str]:
    """The server on a port the OS picked (--port 0); its first stdout line says which."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), ATOLL_API_KEY=KEY)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "atoll.cli",
            "serve",
            str(served_run),
            "--port",
            "0",
            "--threads",
            "1",
            "--max-tokens",
            "32",
            "--model-name",
            "tiny",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the socket listens (or the process dies)
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None else "")  # type: ignore[union-attr]
        yield f"http://127.0.0.1:{match.group(1)}/v1"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture()
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=60)


def test_models_completion_and_streaming(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["tiny"]
    whole = client.completions.create(model="tiny", prompt="the site", max_tokens=12, temperature=0)
    assert (
        whole.choices[0].finish_reason in ("stop", "length")
        and whole.usage is not None
        and whole.usage.completion_tokens >= 1
    )
    stream = client.completions.create(model="tiny", prompt="the site", max_tokens=12, temperature=0, stream=True)
    pieces = [c.choices[0].text for c in stream if c.choices]
    assert len(pieces) > 1 and "".join(pieces) == whole.choices[0].text


def test_chat_with_and_without_streaming(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)  # type: ignore[arg-type]
    assert whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True)  # type: ignore[arg-type]
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == whole.choices[0].message.content


def test_malformed_requests_get_4xx_json_errors(client: openai.OpenAI, server: str) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny", prompt="x", max_tokens=1000)
    assert bad.value.status_code == 400 and "max_tokens" in str(bad.value.body)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])  # type: ignore[list-item]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server, api_key="wrong", max_retries=0).models.list()
    raw = httpx.post(f"{server}/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(server.removesuffix("/v1") + "/health").json()["status"] == "ok"


def test_concurrent_clients_each_get_their_own_answer(client: openai.OpenAI) -> None:
    prompts = ["the site", "a model", "river stone", "king queen"]
    expected = {
        p: client.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0).choices[0].text
        for p in prompts
    }
    got: dict[str, str] = {}

    def ask(prompt: str) -> None:
        stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, stream=True)
        got[prompt] = "".join(c.choices[0].text for c in stream if c.choices)

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == expected
