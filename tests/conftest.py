"""Session fixtures: tiny models of every supported family saved with save_pretrained (no network)."""
from __future__ import annotations

import pytest

from tiny import FAMILIES, VOCAB, build_original, tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """family -> folder holding a saved tiny original model and tokenizer."""
    root = tmp_path_factory.mktemp("originals")
    out = {}
    for fam in FAMILIES:
        d = root / fam
        build_original(fam).save_pretrained(d)
        tiny_tokenizer().save_pretrained(d)
        out[fam] = d
    return out


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    import random
    rng = random.Random(0)
    d = tmp_path_factory.mktemp("corpus")
    for i in range(3):  # a little structure to learn: runs of consecutive words
        lines = []
        for _ in range(120):
            start = rng.randrange(4, VOCAB - 12)
            lines.append(" ".join(f"w{start + k}" for k in range(rng.randint(3, 9))))
        (d / f"book{i}.txt").write_text("\n".join(lines))
    return d
