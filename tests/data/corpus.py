"""Generated English-like and Chinese documents that pass atoll's default filters.

Sentences are drawn from a small grammar over a few hundred words, so documents are
distinct (no accidental near duplicates), have stop words, and are not repetitive.
"""

from __future__ import annotations

import random

SUBJECTS = (
    "the king|a sailor|the old queen|my brother|the network|a careful engineer|the river|this model|our site|"
    "the last packet|a tired student|the gardener"
).split("|")
VERBS = "sees|carries|remembers|builds|follows|answers|forgets|measures|protects|sends|reads|opens".split("|")
OBJECTS = (
    "the letter|a heavy stone|the northern road|an empty house|the broken switch|a quiet song|the long table|"
    "the morning light|a silver crown|the routing table|a narrow bridge|the winter field|an open window|the last train"
).split("|")
TAILS = (
    "before the night falls|with great care|because it is late|and then it rains|for the whole village|"
    "while the others sleep|in the spring|without a word|as the wind turns|near the sea|after the storm|at the gate"
).split("|")
ZH = (
    "我们在数据中心训练一个大型语言模型网络连接很慢所以需要压缩更新"
    "每个站点有自己的加速器内核文档说明了如何配置路由和交换机"
)


def english_document(seed: int, *, sentences: int = 12) -> str:
    """A paragraph-structured English document, different for every seed."""
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(3):
        parts = []
        for _ in range(sentences // 3):
            s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}"
            parts.append(s[0].upper() + s[1:] + f", number {rng.randint(1, 999)}.")
        paragraphs.append(" ".join(parts))
    return "\n\n".join(paragraphs) + "\n"


def chinese_document(seed: int, *, chars: int = 300) -> str:
    """Chinese text (for language identification and routing)."""
    rng = random.Random(seed)
    out = []
    for i in range(chars):
        out.append(rng.choice(ZH))
        if i % 23 == 22:
            out.append("。的了是")
    return "".join(out) + "\n"


def edit_words(text: str, seed: int, *, edits: int = 2) -> str:
    """`text` with a few words replaced: a near duplicate."""
    rng = random.Random(seed)
    words = text.split(" ")
    for _ in range(edits):
        words[rng.randrange(len(words))] = rng.choice(["blue", "seven", "quickly", "stone"])
    return " ".join(words)
