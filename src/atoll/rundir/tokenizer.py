"""A run's text interface: its tokenizer, its special ids, and its chat template.

Every directory a stage can live in (an atoll run, a fine-tuning run, a Hugging Face export)
holds `tokenizer.json`; beside it may sit `tokenizer_config.json` (Hugging Face's special-token
names, `add_bos_token`, maybe a `chat_template`) and `chat_template.jinja` (the template, as
transformers writes it since 4.43). `load_text_tokenizer` reads whatever is there into a
`TextTokenizer`; the raw `tokenizers.Tokenizer` is its `tokenizer` field.

atoll's own tokenizers have `<|endoftext|>` after every document of the pre-training stream, so
it also marks the start of one: prompts get it prepended as BOS, the way every document but the
first was seen in training.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from atoll.data.tokenizer import EOS_TOKEN, PAD_TOKEN
from atoll.errors import AtollError
from atoll.rundir.layout import (
    CHAT_TEMPLATE_FILE,
    GENERATION_CONFIG_JSON,
    HF_CONFIG_JSON,
    TOKENIZER_CONFIG,
    TOKENIZER_JSON,
)

log = logging.getLogger(__name__)

# Role-tagged turns; the assistant's turn ends with the end-of-text token, which stops
# generation. Plain text tags, so any tokenizer can encode them.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{%- if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif -%}"
)

CHAT_ROLES = ("system", "user", "assistant")


@dataclass
class TextTokenizer:
    """Tokenizer plus what generation and training need to know about its special tokens."""

    tokenizer: Tokenizer
    eos_ids: frozenset[int]
    pad_id: int
    bos_id: int | None
    """Prepended to every encoded prompt or document (None: nothing is)."""
    eos_token: str
    chat_template: str
    template_is_default: bool = False

    @property
    def eos_id(self) -> int:
        """The id appended after a training document or response."""
        return min(self.eos_ids)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size())

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            return [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def render_chat(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` ({"role", "content"} dicts). Raises AtollError for a
        template that fails on them."""
        return render_template(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt, eos_token=self.eos_token
        )


def _raise_exception(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)


@functools.lru_cache(maxsize=16)
def _compiled(template: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def render_template(
    template: str,
    messages: Sequence[dict[str, str]],
    *,
    add_generation_prompt: bool,
    eos_token: str,
    bos_token: str = "",
) -> str:
    """Render a Hugging Face-style Jinja chat template in a sandbox (as transformers does)."""
    from jinja2 import TemplateError

    try:
        rendered = _compiled(template).render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            eos_token=eos_token,
            bos_token=bos_token,
        )
        return str(rendered)
    except TemplateError as exc:
        raise AtollError(f"the chat template cannot render these messages: {exc}") from None


def check_template(template: str, *, where: str) -> None:
    """Raise AtollError unless `template` renders a two-turn conversation."""
    try:
        text = render_template(
            template, [{"role": "user", "content": "hi"}], add_generation_prompt=True, eos_token=EOS_TOKEN
        )
    except AtollError as exc:
        raise AtollError(f"chat template {where} does not work: {exc}") from None
    if "hi" not in text:
        raise AtollError(f"chat template {where} drops the message content: it must render messages[i]['content']")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AtollError(f"{path} is not valid JSON ({exc}): repair or remove it") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: object) -> str | None:
    """A special token in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def read_chat_template(directory: Path) -> str | None:
    """The chat template stored in `directory`: chat_template.jinja, else tokenizer_config.json's."""
    file = directory / CHAT_TEMPLATE_FILE
    if file.is_file():
        return file.read_text(encoding="utf-8")
    template = _read_json(directory / TOKENIZER_CONFIG).get("chat_template")
    if isinstance(template, str):
        return template
    return None


def load_text_tokenizer(directory: Path) -> TextTokenizer:
    """The tokenizer of the stage stored in `directory`. Raises AtollError when it has no usable
    tokenizer or no end-of-text token can be found."""
    path = directory / TOKENIZER_JSON
    if not path.is_file():
        raise AtollError(
            f"{directory} has no {TOKENIZER_JSON}: "
            "give a run directory or a Hugging Face directory with a fast tokenizer"
        )
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises a bare Exception for any parse error
        raise AtollError(f"{path} is not a valid tokenizers file ({exc})") from None
    config = _read_json(directory / TOKENIZER_CONFIG)
    eos_ids: set[int] = set()
    eos_token = _token_text(config.get("eos_token")) or EOS_TOKEN
    if (found := tokenizer.token_to_id(eos_token)) is not None:
        eos_ids.add(found)
    for name in (GENERATION_CONFIG_JSON, HF_CONFIG_JSON):
        value = _read_json(directory / name).get("eos_token_id")
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, int):
                eos_ids.add(item)
    if not eos_ids:
        raise AtollError(
            f"the tokenizer in {directory} has no end-of-text token "
            f"({eos_token!r} is unknown and no eos_token_id is configured)"
        )
    eos_id = min(eos_ids)
    eos_token = tokenizer.id_to_token(eos_id) or eos_token
    pad_token = _token_text(config.get("pad_token")) or PAD_TOKEN
    pad_id = tokenizer.token_to_id(pad_token)
    if pad_id is None:
        pad_id = eos_id
    bos_token = _token_text(config.get("bos_token"))
    bos_id: int | None = None
    if not config or (bos_token == EOS_TOKEN and eos_token == EOS_TOKEN):
        bos_id = eos_id  # atoll's own tokenizer (in a run or exported): documents follow <|endoftext|>
    elif bos_token and config.get("add_bos_token"):
        bos_id = tokenizer.token_to_id(bos_token)
    template = read_chat_template(directory)
    return TextTokenizer(
        tokenizer=tokenizer,
        eos_ids=frozenset(eos_ids),
        pad_id=pad_id,
        bos_id=bos_id,
        eos_token=eos_token,
        chat_template=template or DEFAULT_CHAT_TEMPLATE,
        template_is_default=template is None,
    )
