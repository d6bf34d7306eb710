"""Byte-level BPE: train one, load one, and export it for `transformers`.

The tokenizer is lossless by construction: no normalizer, a ByteLevel pre-tokenizer without a
prefix space, the full 256-byte initial alphabet and a ByteLevel decoder, so
`decode(encode(text).ids) == text` for any Unicode text that does not itself spell a special
token (those are matched as special tokens on encode and dropped on decode). Two special
tokens exist, with ids 0 and 1 in a tokenizer trained here: `<|endoftext|>` ends every
document (and doubles as BOS) and `<|pad|>` pads batches.

`fast_encoder` encodes with tiktoken's byte-pair encoder instead (4-5x faster per core here),
for tokenizers of exactly this shape, checked against the `tokenizers` object it stands for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from atoll.errors import AtollError

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = EOS_TOKEN
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)

NUM_BYTES = 256
MIN_VOCAB_SIZE = NUM_BYTES + len(SPECIAL_TOKENS)


def train_bpe(texts: Iterable[str], *, vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer of at most `vocab_size` tokens on `texts`.

    The vocabulary includes the 256 byte symbols and the special tokens; a small corpus may
    yield fewer merges than asked for. Deterministic for the same texts in the same order.
    Raises `AtollError` if `vocab_size` cannot hold the bytes and special tokens.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise AtollError(
            f"vocab_size {vocab_size} is too small: byte-level BPE needs at least "
            f"{MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False: a prefix space would be added on encode and kept on decode,
    # breaking the exact round trip.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    logger.info("trained byte-level BPE with %d tokens", tokenizer.get_vocab_size())
    return tokenizer


def token_id(tokenizer: Tokenizer, token: str) -> int:
    """The id of `token` in `tokenizer`; raises `AtollError` if the tokenizer lacks it."""
    found = tokenizer.token_to_id(token)
    if found is None:
        raise AtollError(
            f"tokenizer has no {token!r} token: use a tokenizer trained by atoll (atoll.data.tokenizer.train_bpe)"
        )
    return found


def load_tokenizer(path: Path | str) -> Tokenizer:
    """Load a `tokenizer.json` written by `train_bpe` (or any with atoll's special tokens).

    Raises `AtollError` if the file is missing, unreadable, or lacks the special tokens.
    """
    path = Path(path)
    if not path.is_file():
        raise AtollError(f"tokenizer file {path} does not exist: pass the path to a tokenizer.json")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises a bare Exception for any parse error
        raise AtollError(
            f"tokenizer file {path} is not a valid tokenizers JSON file ({exc}): "
            "re-create it with atoll's data preparation"
        ) from exc
    for token in SPECIAL_TOKENS:
        if tokenizer.token_to_id(token) is None:
            raise AtollError(
                f"tokenizer file {path} has no {token!r} token: use a tokenizer trained by atoll's data preparation"
            )
    return tokenizer


# GPT-2's pre-tokenizer pattern, the one `pre_tokenizers.ByteLevel(use_regex=True)` applies.
_BYTE_LEVEL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_PROBE = (
    "Netlink sockets (AF_NETLINK) carry 1,024-byte messages; see RFC 3549.\n\n  indented\tline\r\n",
    "ROMEO. But soft! what light through yonder window breaks? It's the east, and Juliet's the sun.",
    "def f(x):\n    return {'a': [1, 2.5e-3]}  # comment\n\n\n",
    "网络命名空间 (network namespace) 与 veth 对；日本語のテキスト、한국어 텍스트. Émile naïve café — “quotes” …",
    "emoji 🙂🚀 and <|endoftext|> inside text, then   many    spaces   ",
)


def _byte_level_alphabet() -> dict[str, int]:
    """ByteLevel's printable stand-in for each byte (GPT-2's bytes_to_unicode), inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(NUM_BYTES):
        if b not in chars:
            chars[b] = chr(NUM_BYTES + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


class FastEncoder:
    """Encodes like a byte-level BPE `Tokenizer`, through tiktoken. Build it with `fast_encoder`."""

    def __init__(self, encoding: Any, specials: set[str]) -> None:
        self._encoding = encoding
        self._specials = specials

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (special tokens spelled in the text are matched, as the
        `tokenizers` object does)."""
        return [self._encoding.encode(t, allowed_special=self._specials) for t in texts]


def fast_encoder(tokenizer: Tokenizer) -> FastEncoder | None:
    """A tiktoken encoder giving `tokenizer`'s ids, or None when it cannot stand in for it.

    Only a tokenizer of `train_bpe`'s shape qualifies: no normalizer, the ByteLevel regex
    pre-tokenizer without prefix space, a plain BPE model (no dropout, unknown token, affixes,
    byte fallback or merge skipping) whose merges create tokens in id order (tiktoken merges by
    the rank of the merged token; BPE by the rank of the merge: the same order then), and
    special tokens matched verbatim. Its ids are then checked on a multi-script probe. Rare
    words can still differ (a token that two different merges could form); callers check a
    sample of their own documents (`atoll.data.stages.encode_texts`). None also when tiktoken
    is not installed.
    """
    try:
        import tiktoken
    except ImportError:
        return None
    spec = json.loads(tokenizer.to_str())
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    if (
        spec.get("normalizer") is not None
        or pre.get("type") != "ByteLevel"
        or pre.get("add_prefix_space")
        or not pre.get("use_regex", True)
    ):
        return None
    if (
        model.get("type") != "BPE"
        or model.get("dropout")
        or model.get("unk_token") is not None
        or model.get("byte_fallback")
        or model.get("ignore_merges")
    ):
        return None
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None
    added = spec.get("added_tokens") or []
    if any(a.get("lstrip") or a.get("rstrip") or a.get("single_word") or a.get("normalized") for a in added):
        return None
    specials = {a["content"]: a["id"] for a in added}
    vocab: dict[str, int] = model["vocab"]
    merged_ids = []
    for merge in model.get("merges", []):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        merged_ids.append(vocab.get(left + right, -1))
    if any(i < 0 for i in merged_ids) or any(b <= a for a, b in zip(merged_ids, merged_ids[1:])):
        return None
    to_byte = _byte_level_alphabet()
    ranks: dict[bytes, int] = {}
    for token, i in vocab.items():
        if token in specials:
            continue
        try:
            ranks[bytes(to_byte[c] for c in token)] = i
        except KeyError:  # a character outside the byte alphabet: not a byte-level vocabulary
            return None
    if len(ranks) + len(specials) != len(vocab) or any(bytes([b]) not in ranks for b in range(NUM_BYTES)):
        return None
    try:
        encoding = tiktoken.Encoding(
            "atoll-bpe", pat_str=_BYTE_LEVEL_PATTERN, mergeable_ranks=ranks, special_tokens=specials
        )
    except ValueError:
        return None
    fast = FastEncoder(encoding, set(specials))
    if fast.encode_batch(list(_PROBE)) != [e.ids for e in tokenizer.encode_batch(list(_PROBE))]:
        logger.info("tiktoken does not reproduce this tokenizer on the probe: encoding with tokenizers")
        return None
    return fast


def file_sha256(path: Path | str) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (shards can be large)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_hf_tokenizer(tokenizer_json: Path, out_dir: Path, *, model_max_length: int) -> None:
    """Write a directory that `transformers.AutoTokenizer.from_pretrained` loads.

    Copies `tokenizer_json` to `out_dir/tokenizer.json` and writes `tokenizer_config.json` and
    `special_tokens_map.json`. The loaded tokenizer gives the same ids as the `tokenizers`
    object (no BOS/EOS added on encode) and decodes without space clean-up, so text round-trips.
    Raises `AtollError` if `tokenizer_json` is not a valid atoll tokenizer.
    """
    load_tokenizer(tokenizer_json)  # validate before writing anything
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer_json, out_dir / "tokenizer.json")
    special_tokens = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_tokens,
        "unk_token": None,
        "model_max_length": model_max_length,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "padding_side": "right",
    }
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", special_tokens)
    logger.info("wrote Hugging Face tokenizer files to %s", out_dir)


def _write_json(path: Path, data: dict[str, object]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
