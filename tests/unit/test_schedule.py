import math

import pytest

from atoll.train.schedule import warmup_cosine


def test_warmup_is_linear_then_cosine_reaches_floor() -> None:
    f = [warmup_cosine(s, warmup_steps=4, total_steps=20, min_ratio=0.1) for s in range(20)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4] == pytest.approx(1.0)
    assert f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:])), "decay must be monotone"
    mid = 4 + (20 - 4 - 1) / 2
    assert warmup_cosine(int(mid), warmup_steps=4, total_steps=20, min_ratio=0.0) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * (int(mid) - 4) / 15))
    )


def test_no_warmup() -> None:
    assert warmup_cosine(0, warmup_steps=0, total_steps=10, min_ratio=0.0) == pytest.approx(1.0)
