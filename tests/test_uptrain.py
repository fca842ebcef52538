"""Uptraining on tiny models: files written, exact resume after kill -9, LoRA merge, budgets, bad input, DDP."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from blockformer.cli import main
from blockformer.errors import BlockformerError
from blockformer.uptrain import UptrainConfig, uptrain
from blockformer.uptrain.data import pack, read_documents
from tiny import VOCAB, convert_tiny, load_block, save_with_other_tokenizer, tiny_tokenizer


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module")
def block(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("blk") / "b"
    convert_tiny(tiny_dirs["llama"], out)
    return out


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "blockformer.cli", "uptrain", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=600)


def losses(out):
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


COMMON = ["--seq-len", "32", "--batch-size", "2", "--max-steps", "8", "--save-every", "2", "--eval-every", "4",
          "--warmup-steps", "2", "--lr", "1e-3"]


def test_files_written_and_model_loads(block, corpus, tiny_dirs, tmp_path):
    s = uptrain(UptrainConfig(str(block), str(corpus), tmp_path / "run", teacher=str(tiny_dirs["llama"]),
                              seq_len=32, batch_size=2, max_steps=4, save_every=2, eval_every=2, align_weight=0.1))
    out = tmp_path / "run"
    assert s["step"] == 4 and len(losses(out)) == 4
    for name in ("uptrain_config.json", "metrics.jsonl", "loss.png", "summary.json", "model/config.json",
                 "model/model.safetensors", "model/tokenizer.json", "checkpoints/step-4/state.pt"):
        assert (out / name).exists(), name
    model = load_block(out / "model")
    assert torch.isfinite(model(torch.randint(3, VOCAB, (1, 9))).logits).all()


def test_resume_after_kill_logs_the_same_losses(block, corpus, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(block, "--data", corpus, "--out", a, *COMMON).returncode == 0
    crashed = run_cli(block, "--data", corpus, "--out", b, *COMMON, env={"BLOCKFORMER_CRASH_AFTER_STEP": "5"})
    assert crashed.returncode == -9 and not (b / "model").exists()
    assert len(losses(b)) == 5  # steps 1-5 logged; the checkpoint is step 4
    r = run_cli(block, "--data", corpus, "--out", b, *COMMON, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert losses(b) == pytest.approx(losses(a), rel=1e-6, abs=1e-7)
    sa, sb = (load_block(x / "model").state_dict() for x in (a, b))
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)


def test_lora_trains_adapters_and_new_parts_then_merges(block, corpus, tmp_path):
    from peft import PeftModel  # noqa: F401 - installed; the result must load without it
    uptrain(UptrainConfig(str(block), str(corpus), tmp_path / "run", seq_len=32, batch_size=2, max_steps=3,
                          lora_rank=4, lr=1e-2, warmup_steps=1))
    before, after = load_block(block).state_dict(), load_block(tmp_path / "run" / "model").state_dict()
    assert set(before) == set(after)  # merged: no lora_* tensors left
    assert not torch.equal(before["embedder.proj.weight"], after["embedder.proj.weight"])
    assert not torch.equal(before["block_decoder.layers.0.attn.q.weight"], after["block_decoder.layers.0.attn.q.weight"])
    assert torch.equal(before["token_decoder.embed.weight"], after["token_decoder.embed.weight"])  # no adapter there


def test_freeze_keeps_parts_fixed(block, corpus, tmp_path):
    uptrain(UptrainConfig(str(block), str(corpus), tmp_path / "run", seq_len=32, batch_size=2, max_steps=2,
                          freeze=("block_decoder",)))
    before, after = load_block(block).state_dict(), load_block(tmp_path / "run" / "model").state_dict()
    assert torch.equal(before["block_decoder.layers.1.mlp.up.weight"], after["block_decoder.layers.1.mlp.up.weight"])
    assert not torch.equal(before["token_decoder.layers.1.mlp.up.weight"], after["token_decoder.layers.1.mlp.up.weight"])


def test_packing_pads_documents_and_masks_them(corpus):
    docs = read_documents(str(corpus))
    p = pack(docs, tiny_tokenizer(), 32, 4, seed=1)
    assert p.ids.shape[1] == 32 and p.n_val >= 1 and p.n_train > 0
    assert ((p.labels == -100) | p.mask).all()  # pads are never predicted
    assert (~p.mask).any()                       # the paper's random first-block padding is there


def test_nan_loss_stops_with_a_clear_message(block, corpus, tmp_path):
    with pytest.raises(BlockformerError, match="loss became"):
        uptrain(UptrainConfig(str(block), str(corpus), tmp_path / "run", seq_len=32, batch_size=2, max_steps=30,
                              lr=1e30, warmup_steps=1, save_every=1, grad_clip=0.0))
    assert list((tmp_path / "run" / "checkpoints").glob("step-*"))  # the last good checkpoint is kept


@pytest.mark.parametrize("setup,args,msg", [
    ("empty", [], "holds no text"),
    ("missing", [], "not found"),
    ("nofield", ["--text-field", "body"], "no field 'body'"),
    ("exists", [], "already exists"),
    ("nobudget", ["--max-steps", "0"], "set a budget"),
])
def test_bad_input(block, tmp_path, setup, args, msg):
    data = tmp_path / "d.txt"
    data.write_text("" if setup == "empty" else "w5 w6 w7 " * 200)
    if setup == "nofield":
        data = tmp_path / "d.jsonl"
        data.write_text(json.dumps({"text": "w5 w6"}) + "\n")
    if setup == "missing":
        data = tmp_path / "nope.txt"
    out = tmp_path / "out"
    if setup == "exists":
        out.mkdir()
    budget = [] if setup == "nobudget" else ["--max-steps", "1"]
    r = CliRunner().invoke(main, ["uptrain", str(block), "--data", str(data), "--out", str(out), "--seq-len", "16",
                                  *budget, *args])
    assert r.exit_code != 0 and msg in r.output and "Traceback" not in r.output, r.output


def test_teacher_with_another_tokenizer_is_refused(block, corpus, tiny_dirs, tmp_path):
    other = save_with_other_tokenizer(tiny_dirs["llama"], tmp_path / "teacher")
    with pytest.raises(BlockformerError, match="different tokenizer"):
        uptrain(UptrainConfig(str(block), str(corpus), tmp_path / "run", teacher=str(other), max_steps=1))


def test_seq_len_is_rounded_up_to_the_block_length(block, corpus, tmp_path):
    r = CliRunner().invoke(main, ["uptrain", str(block), "--data", str(corpus), "--out", str(tmp_path / "o"),
                                  "--seq-len", "30", "--max-steps", "1", "--batch-size", "2"])
    assert r.exit_code == 0 and "rounded up to 32" in r.output


def test_two_process_ddp_matches_one_process(block, corpus, tmp_path):
    """accelerate launch with 2 CPU processes (gloo), 2 rows each, vs one process with 4 rows: same losses."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--data", corpus, "--seq-len", "32", "--max-steps", "3", "--warmup-steps", "1", "--precision", "fp32"]
    assert run_cli(block, "--out", one, "--batch-size", "4", *args).returncode == 0
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
                        "blockformer.cli", "uptrain", str(block), "--out", str(two), "--batch-size", "2",
                        *map(str, args)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
