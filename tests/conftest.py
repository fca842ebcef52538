"""Session fixtures: tiny models of every supported family saved with save_pretrained (no network)."""
from __future__ import annotations

import pytest

from tiny import FAMILIES, build_original, tiny_tokenizer


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


