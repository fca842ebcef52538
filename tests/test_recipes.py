"""Recipes: value checks shared with the stage configs, the uptraining budget, and every shipped recipe dry-run at
its real shapes on the meta device (no hub, no weights, no GPU: meta tensors have shapes and no data)."""
from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from blockformer.cli import main
from blockformer.errors import BlockformerError
from blockformer.pipeline import load_recipe
from blockformer.pipeline.recipe import RECIPES, budget_steps, build

SHIPPED = sorted(p.stem for p in RECIPES.glob("*.yaml"))


def recipe_file(tmp_path: Path, text: str | bytes) -> Path:
    p = tmp_path / "r.yaml"
    (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)
    return p


def one_line_error(spec: str, match: str) -> str:
    with pytest.raises(BlockformerError) as e:
        load_recipe(spec)
    msg = str(e.value)
    assert match in msg and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("text,match", [
    ("uptrain:\n  freeze: [1, 2]\n", "'uptrain.freeze' must be a list of str, got [1, 2]"),
    ("uptrain:\n  freeze: embedder\n", "'uptrain.freeze' must be"),
    ("bench:\n  batch_sizes: [8, x]\n", "'bench.batch_sizes' must be a list of int"),
    ("uptrain:\n  save_every: 0\n", "uptrain.save_every"),   # UptrainConfig.check, as for the CLI
    ("uptrain:\n  lr: -1\n", "uptrain.lr"),                  # UptrainConfig.check
    ("uptrain:\n  freeze: [embedder, typo]\n", "typo"),      # UptrainConfig.check
    ("bench:\n  repeats: 0\n", "bench.repeats"),             # BenchConfig.check
    ("bench:\n  batch_sizes: [0]\n", "bench.batch_sizes"),   # BenchConfig.check
])
def test_bad_values_are_one_line_errors_naming_the_key(tmp_path, text, match):
    msg = one_line_error(str(recipe_file(tmp_path, text)), match)
    assert msg.startswith(str(tmp_path / "r.yaml")) and ("must be" in msg or "unknown" in msg), msg


def test_stage_checks_run_on_the_merged_options(tmp_path, monkeypatch):
    """build() constructs each stage's config and calls its check(), prefixing the recipe path and section."""
    from blockformer.uptrain import UptrainConfig
    seen = []

    def check(self):
        seen.append((self.lr, self.seq_len, self.freeze))
        if self.lr < 0:
            raise BlockformerError(f"--lr must be positive, got {self.lr}")
    monkeypatch.setattr(UptrainConfig, "check", check, raising=False)
    p = recipe_file(tmp_path, "uptrain:\n  lr: -0.5\n  freeze: [embedder]\n")
    assert one_line_error(str(p), "uptrain.lr must be positive, got -0.5") == \
        f"{p}: uptrain.lr must be positive, got -0.5"
    assert seen == [(-0.5, 256, ("embedder",))]   # recipe defaults merged in, lists passed as the stage gets them


@pytest.mark.parametrize("content,match", [
    (bytes(random.Random(0).randrange(256) for _ in range(300)) + b"\xff\xfe", "not a UTF-8 text file"),
    ("\x00\x01\x02".encode(), "not valid YAML"),
    ("- convert\n- uptrain\n", "a recipe is a mapping of keys, got list"),
    ("just words\n", "a recipe is a mapping of keys, got str"),
    ("uptrain:\n  lr: 0.001\n  seq_len: 256\n  lr: 0.1\n", ":4: not valid YAML (key 'lr' is given twice)"),
    ("out: a\nout: b\n", ":2: not valid YAML (key 'out' is given twice)"),
])
def test_unreadable_recipes_are_one_line_errors(tmp_path, content, match):
    p = recipe_file(tmp_path, content)
    r = CliRunner().invoke(main, ["run", str(p)])
    assert r.exit_code == 1 and match in r.output and "Traceback" not in r.output, r.output
    assert r.output.count("\n") == 1 and r.output.startswith(f"error: {p}")


def test_a_folder_is_not_a_recipe(tmp_path):
    one_line_error(str(tmp_path), "cannot read")


# ------------------------------------------------------------------------------------------- budget
BUDGET = {"max_tokens": None, "max_steps": None, "max_time": None, "seq_len": 2048, "batch_size": 8,
          "grad_accum": 4, "warmup_steps": 10, "save_every": 10}


@pytest.mark.parametrize("given,steps", [
    ({"max_tokens": 2_000_000}, 31),                       # ceil(2M / (8 * 4 * 2048)), as uptrain counts
    ({"max_steps": 40, "max_tokens": 2_000_000}, 31),      # the first budget reached ends the run
    ({"max_steps": 12}, 12),
    ({"max_tokens": 2_000_000, "seq_len": 2047}, 31),      # seq_len rounds up to the block length
    ({"max_time": 600.0}, None),                           # a time budget has no step count
])
def test_budget_steps(given, steps):
    assert budget_steps({**BUDGET, **given}, block_length=4) == steps


@pytest.mark.parametrize("uptrain,match", [
    ({"max_tokens": 2_000_000, "warmup_steps": 50}, "uptrain.warmup_steps (50) must be below the 31 steps"),
    ({"max_tokens": 2_000_000, "warmup_steps": 31}, "uptrain.warmup_steps (31) must be below the 31 steps"),
    ({"max_tokens": 2_000_000, "save_every": 50}, "uptrain.save_every (50) must be at most the 31 steps"),
    ({"max_steps": 5, "warmup_steps": 1, "save_every": 6}, "uptrain.save_every (6) must be at most the 5 steps"),
])
def test_warmup_and_checkpoints_must_fit_the_budget(tmp_path, uptrain, match):
    p = recipe_file(tmp_path, yaml.safe_dump({"uptrain": {**BUDGET, **uptrain}}))
    one_line_error(str(p), match)


@pytest.mark.parametrize("uptrain", [
    {"max_tokens": 2_000_000, "warmup_steps": 30, "save_every": 31},
    {"max_time": 60.0, "warmup_steps": 1000, "save_every": 1000},            # cannot be checked: accepted
    {"enabled": False, "max_steps": 2, "warmup_steps": 50, "save_every": 50},  # not run: not checked
])
def test_budgets_that_fit_or_cannot_be_checked_are_accepted(tmp_path, uptrain):
    load_recipe(str(recipe_file(tmp_path, yaml.safe_dump({"uptrain": {**BUDGET, **uptrain}}))))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_leave_warmup_and_checkpoint(name):
    r = load_recipe(name)
    steps = budget_steps(r.uptrain, r.convert["block_length"])
    assert steps and r.uptrain["warmup_steps"] < steps and r.uptrain["save_every"] <= steps
    assert r.uptrain["eval_every"] <= steps and steps // r.uptrain["save_every"] >= 2, (name, steps)


def test_default_recipe_keeps_its_budget():
    r = load_recipe("smollm2-135m-cpu")
    assert budget_steps(r.uptrain, 4) == 32 and (r.uptrain["warmup_steps"], r.uptrain["save_every"]) == (4, 8)
    assert r.uptrain == build({}, Path("x.yaml")).uptrain


# ------------------------------------------------------------------------------------------- meta dry run
# Public config.json values of the shipped recipes' sources (no hub here). SmolLM2's match the embedded GGUF.
SOURCES = {
    "default": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
                    bos_token_id=1, eos_token_id=2),
    "EleutherAI/pythia-410m": dict(model_type="gpt_neox", vocab_size=50304, hidden_size=1024, intermediate_size=4096,
                                   num_hidden_layers=24, num_attention_heads=16, max_position_embeddings=2048,
                                   rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True,
                                   hidden_act="gelu", layer_norm_eps=1e-5, tie_word_embeddings=False,
                                   bos_token_id=0, eos_token_id=0),
    "Qwen/Qwen2.5-0.5B": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                              num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                              max_position_embeddings=32768, max_window_layers=24, sliding_window=32768,
                              use_sliding_window=False, rope_theta=1000000.0, rms_norm_eps=1e-6,
                              tie_word_embeddings=True, hidden_act="silu", bos_token_id=151643,
                              eos_token_id=151643),
    "meta-llama/Llama-3.2-1B": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                    max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                                    rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                  "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                                    tie_word_embeddings=True, hidden_act="silu", bos_token_id=128000,
                                    eos_token_id=128001),
}


def meta_conversion(recipe, tmp_path):
    """The conversion's config and weight mapping at the source's real shapes, with every tensor on meta."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from blockformer.convert import ConvertConfig
    from blockformer.convert.convert import DTYPES, assemble, check_window_fits, max_positions, plan_parts, validate
    from blockformer.families import family_for
    from blockformer.sources import Source
    spec = dict(SOURCES[recipe.source])
    hf = AutoConfig.for_model(spec.pop("model_type"), **spec)
    cc = ConvertConfig(recipe.source, tmp_path / "converted", **recipe.options("convert"))
    validate(cc)
    fam = family_for(hf.model_type)
    arch = fam.arch(hf)
    parts = plan_parts(cc, hf.num_hidden_layers)
    check_window_fits(cc, max_positions(hf, arch))
    with torch.device("meta"):
        original = AutoModelForCausalLM.from_config(hf, dtype=DTYPES[cc.dtype] or torch.float32)
        model = assemble(cc, hf, arch, Source(recipe.source, recipe.source, None, "hub"), original, fam, parts)
    return original, model


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_dry_run_on_meta(name, tmp_path):
    """Convert, then one training micro-step at the recipe's batch and length: the student's forward with its
    cross-entropy, the teacher's forward, the distillation term on the two vocabularies, backward."""
    import torch.nn.functional as F
    r = load_recipe(name)
    original, model = meta_conversion(r, tmp_path)
    c, u, L = model.config, r.uptrain, r.convert["block_length"]
    assert c.embedder_layers + c.num_block_layers + c.num_token_layers == original.config.num_hidden_layers
    assert c.block_length == L and c.vocab_size == original.config.vocab_size
    B, T = u["batch_size"], math.ceil(u["seq_len"] / L) * L
    ids = torch.zeros(B, T, dtype=torch.long, device="meta")
    mask = torch.ones(B, T, dtype=torch.bool, device="meta")
    model.train()
    h, ctx, _ = model(ids, attention_mask=mask, return_hidden=True).hidden_states
    assert h.shape == (B, T, c.hidden_size) and ctx.shape == (B, math.ceil((T + L - 1) / L), c.hidden_size)
    out = model(ids, attention_mask=mask, labels=ids)
    with torch.no_grad():   # HF's mask builder reads mask values, which meta tensors lack: the teacher runs unmasked
        t_logits = original(input_ids=ids).logits
    assert out.logits.shape == t_logits.shape == (B, T, c.vocab_size)
    tau, w = u["temperature"], u["kd_weight"]
    kd = F.kl_div(F.log_softmax(out.logits.float() / tau, -1), F.log_softmax(t_logits.float() / tau, -1),
                  log_target=True, reduction="batchmean")
    loss = (1 - w) * out.loss + w * tau ** 2 * kd
    loss.backward()
    assert loss.shape == () and model.get_output_embeddings().weight.grad.shape == (c.vocab_size, c.hidden_size)
    assert model.embedder.proj.weight.grad.shape == (c.hidden_size, L * c.hidden_size)
    assert model.token_decoder.expand.weight.grad.shape == (c.prefix_length * c.hidden_size, c.hidden_size)
    for P, G in r.bench["scenarios"].values():
        assert P + G <= c.max_position_embeddings, (name, P, G)
