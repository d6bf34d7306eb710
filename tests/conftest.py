"""Shared fixtures: a tiny generated corpus, prepared once per session, and a CLI runner."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

WORDS = (
    "the a site link model token data center network rank step loss train learn slow fast "
    "packet route switch river stone light king queen sword crown night day sea wind fire "
    "计算 网络 模型 训练 数据"
).split()


def generated_documents(num_docs: int = 24, *, seed: int = 0) -> list[Any]:
    """Small deterministic documents: enough text for a few hundred sequences of 32 tokens."""
    from atoll.data import Document

    rng = random.Random(seed)
    docs = []
    for i in range(num_docs):
        sentences = []
        for _ in range(rng.randint(30, 50)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
            sentences.append(" ".join(words).capitalize() + ".")
        docs.append(Document(id=f"doc{i:03d}", source="generated", text=" ".join(sentences)))
    return docs


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """In-process tests run tiny models: one thread is fastest, and on a busy two-core machine
    more threads only wait for each other. Child processes choose their own."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared data directory (vocab 320, seq_len 32) built from generated text."""
    from atoll.data.corpus import prepare_corpus

    out = tmp_path_factory.mktemp("tiny-data")
    prepare_corpus(generated_documents(), out, vocab_size=320, seq_len=32, val_fraction=0.15, seed=0, shard_tokens=4096)
    return out


def tiny_config(tmp_path: Path, data_dir: Path, **sections: dict[str, Any]) -> Path:
    """Write a run config for the tiny preset on `data_dir`; `sections` update the defaults."""
    cfg: dict[str, Any] = {
        "run": {"name": "t", "dir": str(tmp_path / "runs"), "seed": 0},
        "model": {"preset": "tiny"},
        "data": {"dir": str(data_dir), "prepare": "none", "seq_len": 32},
        "train": {
            "steps": 8,
            "global_batch": 4,
            "micro_batch": 2,
            "lr": 3e-3,
            "warmup_steps": 2,
            "log_every": 1,
            "eval_every": 4,
            "eval_batches": 2,
            "checkpoint_every": 4,
        },
        "parallel": {"device": "cpu", "threads": 1},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def run_atoll(*args: str, timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `atoll` CLI in a child process."""
    child_env = dict(os.environ, ATOLL_NO_PROGRESS="1", PYTHONPATH=str(REPO / "src"))
    child_env.pop("RANK", None)
    child_env.pop("WORLD_SIZE", None)
    if env:
        child_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "atoll.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env,
        cwd=REPO,
    )
