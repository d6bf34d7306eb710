"""Fine-tuning data: reading, splitting by hash, masks (loss on responses only), the example configs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from tokenizers import Tokenizer

from atoll.config import RunConfig, load_config
from atoll.data import train_bpe
from atoll.errors import AtollError
from atoll.finetune.config import FinetuneConfig, FinetuneDataSection
from atoll.finetune.data import (
    Example,
    ExampleStream,
    chunk_examples,
    content_hash,
    encode_instruct,
    encode_text,
    read_examples,
    split_examples,
    strip_rst,
)
from atoll.model import ModelConfig, Transformer
from atoll.model.loss import masked_loss_sum
from atoll.rundir.tokenizer import DEFAULT_CHAT_TEMPLATE, TextTokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    tok: Tokenizer = train_bpe(["What is two plus two? Four. The packet is routed by the kernel."] * 20, vocab_size=300)
    return TextTokenizer(
        tokenizer=tok,
        eos_ids=frozenset({0}),
        pad_id=1,
        bos_id=0,
        eos_token="<|endoftext|>",
        chat_template=DEFAULT_CHAT_TEMPLATE,
    )


def test_instruct_mask_covers_exactly_the_response_and_its_end(tokenizer: TextTokenizer) -> None:
    ex = Example(id="a", prompt="What is two plus two?", response="Four.")
    tokens, mask, dropped = encode_instruct([ex], tokenizer, seq_len=64, prompt_format="plain")
    prompt_ids = tokenizer.encode("What is two plus two?")
    response_ids = tokenizer.encode("Four.", add_bos=False) + [tokenizer.eos_id]
    assert dropped == 0
    ids = prompt_ids + response_ids
    assert tokens[0, : len(ids)].tolist() == ids
    assert (tokens[0, len(ids) :] == tokenizer.pad_id).all()
    # target t predicts ids[t + 1]: exactly the response tokens (and the end-of-text) count
    assert np.flatnonzero(mask[0]).tolist() == list(range(len(prompt_ids) - 1, len(ids) - 1))
    assert [int(tokens[0, t + 1]) for t in np.flatnonzero(mask[0])] == response_ids


def test_loss_is_computed_on_the_response_only(tokenizer: TextTokenizer) -> None:
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=300, dim=32, num_layers=1, num_heads=2, num_kv_heads=2, ffn_dim=64, max_seq_len=64)
    )
    ex = Example(id="a", prompt="What is two plus two?", response="Four.")
    tokens, mask, _ = encode_instruct([ex], tokenizer, seq_len=63, prompt_format="chat")
    tok, msk = torch.from_numpy(tokens), torch.from_numpy(mask)
    got = masked_loss_sum(model, tok, msk, device=torch.device("cpu"), dtype="fp32")
    with torch.no_grad():
        logits = model(tok[:, :-1])
    per_target = F.cross_entropy(logits.reshape(-1, 300), tok[:, 1:].reshape(-1), reduction="none")
    assert torch.allclose(got, per_target[msk.reshape(-1)].sum())
    assert not msk[0, 0] and int(msk.sum()) == len(tokenizer.encode("Four.", add_bos=False)) + 1


def test_chat_prompt_format_wraps_the_prompt_as_a_user_turn(tokenizer: TextTokenizer) -> None:
    tokens, _, _ = encode_instruct(
        [Example(id="a", prompt="hi", response="ok")], tokenizer, seq_len=64, prompt_format="chat"
    )
    text = tokenizer.decode(tokens[0].tolist())
    assert text.startswith("<|user|>\nhi\n<|assistant|>\nok")


def test_long_prompts_are_dropped_and_long_responses_cut(tokenizer: TextTokenizer) -> None:
    long = Example(id="a", prompt="packet " * 80, response="x")
    fits = Example(id="b", prompt="hi", response="routed " * 80)
    tokens, mask, dropped = encode_instruct([long, fits], tokenizer, seq_len=16, prompt_format="plain")
    assert dropped == 1 and tokens.shape == (1, 17) and mask[0, -1]


def test_text_windows_mask_real_tokens_and_end_documents(tokenizer: TextTokenizer) -> None:
    docs = [Example(id=str(i), text="The packet is routed by the kernel. " * (i + 1)) for i in range(3)]
    tokens, mask = encode_text(docs, tokenizer, seq_len=16)
    stream = [tokenizer.bos_id] + [
        t for d in docs for t in tokenizer.encode(d.text, add_bos=False) + [tokenizer.eos_id]
    ]
    assert tokens.shape[1] == 17 and int(mask.sum()) == len(stream) - 1
    assert tokens[0, 0] == tokenizer.bos_id and tokens[1, 0] == tokens[0, 16]  # windows overlap by one token
    last_real = (len(stream) - 1) - 16 * (len(tokens) - 1)
    assert mask[-1, :last_real].all() and not mask[-1, last_real:].any()


def test_split_is_by_hash_deterministic_and_keeps_duplicates_together() -> None:
    docs = [Example(id=str(i), text=f"document number {i} about routing") for i in range(200)]
    docs.append(Example(id="dup", text="document   number 7 about\nrouting"))  # same text, other spacing
    train, val, dropped = split_examples(docs, validation_fraction=0.1)
    again = split_examples(list(reversed(docs)), validation_fraction=0.1)
    assert dropped == 1 and len(train) + len(val) == 200
    assert {content_hash(e.text) for e in val} == {content_hash(e.text) for e in again[1]}  # order does not matter
    assert 5 <= len(val) <= 40
    assert not {content_hash(e.text) for e in train} & {content_hash(e.text) for e in val}


def test_split_holds_out_at_least_one_and_honours_explicit_validation() -> None:
    docs = [Example(id=str(i), text=f"doc {i}") for i in range(3)]
    train, val, _ = split_examples(docs, validation_fraction=0.001)
    assert len(val) == 1 and len(train) == 2
    train, val, dropped = split_examples(docs, validation_fraction=0.5, validation=[Example(id="x", text="doc  1")])
    assert [e.id for e in train] == ["0", "2"] and dropped == 1 and len(val) == 1
    with pytest.raises(AtollError, match="no training documents"):
        split_examples(docs[:1], validation_fraction=0.5, validation=docs[:1])


def test_read_text_gz_jsonl_and_errors(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("plain text\n")
    (tmp_path / "d" / "b.rst.gz").write_bytes(
        gzip.compress(b".. SPDX-License-Identifier: GPL-2.0\n\nTitle\n=====\n\nSee :ref:`the docs <x>` and ``code``.\n")
    )
    (tmp_path / "d" / "skip.txt").write_text("excluded\n")
    cfg = FinetuneDataSection(paths=[tmp_path / "d"], exclude=["skip*"], markup="rst")
    examples, sources = read_examples(cfg.paths, cfg)
    assert [e.id for e in examples] == ["a.txt", "b.rst.gz"] and len(sources) == 2
    assert examples[1].text == "Title\n\nSee the docs and code.\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p"\n')
    with pytest.raises(AtollError, match=r"bad.jsonl:2 is not valid JSON"):
        read_examples([bad], FinetuneDataSection(paths=[bad], format="instruct"))
    bad.write_text('{"prompt": "p", "answer": "r"}\n')
    with pytest.raises(AtollError, match=r"bad.jsonl:1 has no string field 'response'.*answer"):
        read_examples([bad], FinetuneDataSection(paths=[bad], format="instruct"))
    with pytest.raises(AtollError, match="does not exist"):
        read_examples([tmp_path / "nope"], FinetuneDataSection(paths=[tmp_path / "nope"]))


def test_strip_rst_and_chunking() -> None:
    assert (
        strip_rst(".. toctree::\n   :maxdepth: 2\n\nIntro\n-----\nText\n\n.. code-block:: c\n\n   int x;\n")
        == "Intro\nText\n\n   int x;\n"
    )
    doc = Example(id="d", text="\n\n".join(f"paragraph {i} " * 5 for i in range(10)))
    pieces = chunk_examples([doc], max_chars=200)
    assert len(pieces) > 2 and all(len(p.text) <= 260 for p in pieces)
    assert " ".join(" ".join(p.text.split()) for p in pieces) == " ".join(doc.text.split())
    assert chunk_examples([doc], max_chars=0) == [doc]


def test_example_stream_resumes_exactly() -> None:
    a = ExampleStream(10, global_batch=4, seed=3)
    first = [a.next_indices().tolist() for _ in range(3)]
    b = ExampleStream(10, global_batch=4, seed=3)
    b.next_indices()
    c = ExampleStream(10, global_batch=4, seed=3)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    assert [c.next_indices().tolist() for _ in range(2)] == first[1:]
    assert len(set(first[0] + first[1])) == 8  # an epoch visits every row once
    with pytest.raises(AtollError, match="seed"):
        ExampleStream(10, global_batch=4, seed=4).load_state_dict(b.state_dict())


def test_every_example_finetune_config_validates() -> None:
    paths = sorted((REPO / "examples" / "finetune").glob("*.yaml"))
    assert len(paths) >= 3
    for path in paths:
        if "finetune" in yaml.safe_load(path.read_text()):
            cfg = load_config(FinetuneConfig, path)
            assert cfg.finetune.parent and cfg.data.paths, path
        else:
            assert load_config(RunConfig, path).train.steps > 0, path


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("finetune: {parent: x, method: lora, lora: {rnak: 4}}\ndata: {paths: [x]}\n")
    with pytest.raises(AtollError, match="unknown key 'finetune.lora.rnak'"):
        load_config(FinetuneConfig, path)
    path.write_text("finetune: {parent: x, lora: {target_modules: [qkv]}}\ndata: {paths: [x]}\n")
    with pytest.raises(AtollError, match="finetune.lora.target_modules"):
        load_config(FinetuneConfig, path)


def test_documents_are_recovered_from_pretraining_shards_for_the_overlap_check(tiny_data: Path) -> None:
    from atoll.data import split_documents
    from atoll.eval.heldout import load_heldout, parse_data_arg, shard_documents
    from tests.conftest import generated_documents

    train, val = split_documents(generated_documents(), val_fraction=0.15, seed=0)
    assert shard_documents(tiny_data, "train") == [d.text for d in train]
    held = load_heldout("general", tiny_data)
    assert held.hashes() == {content_hash(d.text) for d in val}
    assert not held.hashes() & {content_hash(d.text) for d in train}
    assert (
        parse_data_arg("net=runs/x") == ("net", Path("runs/x")) and parse_data_arg("data/netlink.jsonl")[0] == "netlink"
    )
    with pytest.raises(AtollError, match="NAME=PATH"):
        parse_data_arg("=x")
