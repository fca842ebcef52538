"""`blockformer synth`: the original writes a seeded, reproducible training corpus that uptrain reads."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from blockformer.cli import main
from blockformer.errors import BlockformerError
from blockformer.uptrain.config import SYNTH_KINDS, SynthConfig
from blockformer.uptrain.data import read_documents
from blockformer.uptrain.synth import KINDS, prompt_plan, render, synth
from tiny import convert_tiny


def run(src, out, **kw):
    return synth(SynthConfig(str(src), out, **{"tokens": 40, "batch_size": 3, "max_new_tokens": 6, **kw}))


def test_corpus_is_written_reproducibly_and_read_by_uptrain(tiny_dirs, tmp_path):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    s = run(tiny_dirs["llama"], a)
    run(tiny_dirs["llama"], b)
    run(tiny_dirs["llama"], c, seed=1)
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    assert s["tokens"] >= 40 and s["documents"] == len(rows)
    assert {r["kind"] for r in rows} == set(SYNTH_KINDS)          # kinds interleave from the first batch
    # a base model (no chat template) continues a heading, which the document keeps
    assert all(r["text"].startswith(render_head(r)) and len(r["text"]) > len(render_head(r)) for r in rows)
    assert a.read_bytes() == b.read_bytes() and a.read_bytes() != c.read_bytes()
    assert read_documents(str(a)) == [r["text"] for r in rows]


def render_head(row):
    class Plain:
        chat_template = None
    return render(Plain(), row["kind"], row["topic"])[1]


def test_instruction_models_are_asked_and_only_the_answer_is_kept():
    class Chat:
        chat_template = "x"
        def apply_chat_template(self, msgs, tokenize, add_generation_prompt):
            return f"<user>{msgs[0]['content']}<assistant>"
    prompt, head = render(Chat(), "howto", "boil an egg")
    assert prompt == "<user>Explain how to boil an egg, step by step.<assistant>" and head == ""


def test_prompt_plan_covers_every_topic_of_each_kind_before_repeating():
    plan = prompt_plan(("article", "story"), seed=0)
    first = [next(plan) for _ in range(2 * len(KINDS["article"][0]))]
    assert {t for k, t in first if k == "article"} == set(KINDS["article"][0])
    assert set(KINDS) == set(SYNTH_KINDS)


def test_existing_output_and_bad_options_are_one_line(tiny_dirs, tmp_path):
    out = tmp_path / "t.jsonl"
    out.write_text("mine\n")
    r = CliRunner().invoke(main, ["synth", str(tiny_dirs["llama"]), "--out", str(out), "--tokens", "8"])
    assert r.exit_code != 0 and "already exists" in r.output and "Traceback" not in r.output
    assert out.read_text() == "mine\n"
    r = CliRunner().invoke(main, ["synth", str(tiny_dirs["llama"]), "--out", str(tmp_path / "u"), "--kinds", "poem"])
    assert r.exit_code != 0 and "kinds" in r.output and len(r.output.strip().splitlines()) == 1


def test_a_block_transformer_is_refused(tiny_dirs, tmp_path):
    convert_tiny(tiny_dirs["llama"], tmp_path / "block")
    with pytest.raises(BlockformerError, match="original model writes"):
        run(tmp_path / "block", tmp_path / "t.jsonl")
