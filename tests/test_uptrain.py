"""Uptraining on tiny models: files written, exact resume after kill -9, LoRA merge, budgets, bad input, DDP."""
from __future__ import annotations

import errno
import json
import math
import os
import random
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
                 "model/model.safetensors", "model/tokenizer.json", "checkpoints/step-4/state.json",
                 "checkpoints/step-4/model.safetensors", "checkpoints/step-4/optimizer.safetensors"):
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


@pytest.mark.parametrize("args", [["--freeze", "block_decoder", "--freeze", "embedder"],
                                  ["--freeze", "block_decoder,embedder"]])
def test_freeze_given_twice_or_with_commas_freezes_every_part(block, corpus, tmp_path, args):
    # a repeated --freeze once kept only its last value, silently: both forms must freeze both parts
    out = tmp_path / "o"
    r = CliRunner().invoke(main, ["uptrain", str(block), "--data", str(corpus), "--out", str(out), "--seq-len", "32",
                                  "--batch-size", "2", "--max-steps", "2", "--warmup-steps", "1", *args])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "uptrain_config.json").read_text())["freeze"] == ["block_decoder", "embedder"]
    before, after = load_block(block).state_dict(), load_block(out / "model").state_dict()
    for frozen in ("block_decoder.layers.1.mlp.up.weight", "embedder.proj.weight"):
        assert torch.equal(before[frozen], after[frozen]), frozen
    assert not torch.equal(before["token_decoder.layers.1.mlp.up.weight"], after["token_decoder.layers.1.mlp.up.weight"])


def test_binary_jsonl_is_one_line(block, tmp_path):
    bad = tmp_path / "data.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n' + bytes(range(128, 256)) * 3)
    r = CliRunner().invoke(main, ["uptrain", str(block), "--data", str(bad), "--out", str(tmp_path / "o"),
                                  "--max-steps", "1"])
    errors = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert r.exit_code == 1 and len(errors) == 1 and "data.jsonl: not UTF-8" in errors[0], r.output
    assert "Traceback" not in r.output and not (tmp_path / "o").exists()


def test_packing_pads_documents_and_masks_them():
    """Hand-made documents: the rows, put back in order, are each document's tokens + EOS after U{0..L_B-1} pads
    drawn from the seed; labels are the ids themselves (the loss shifts) except at pads and at the first token after
    a document's pads, which has no real predecessor; the validation rows are a slice of the same permutation."""
    tok, L, T, seed = tiny_tokenizer(), 4, 16, 3
    docs = [" ".join(f"w{(7 * d + i) % 50}" for i in range(5 + 3 * d)) for d in range(12)]
    p = pack(docs, tok, T, L, val_fraction=0.25, seed=seed)
    back = torch.argsort(torch.randperm(p.ids.shape[0], generator=torch.Generator().manual_seed(seed)))
    ids, mask, labels = (x[back].flatten().tolist() for x in (p.ids, p.mask, p.labels))
    rng, ex_ids, ex_mask, ex_labels = random.Random(seed), [], [], []
    for d in docs:
        n_pad, toks = rng.randrange(L), tok.encode(d, add_special_tokens=False) + [tok.eos_token_id]
        ex_ids += [tok.pad_token_id] * n_pad + toks
        ex_mask += [False] * n_pad + [True] * len(toks)
        ex_labels += [-100] * n_pad + [toks[0] if n_pad == 0 else -100] + toks[1:]
    n = len(ids)
    assert n == len(ex_ids) // T * T and n > 4 * T
    assert (ids, mask, labels) == (ex_ids[:n], ex_mask[:n], ex_labels[:n])
    assert 0 < ex_mask.count(False) < len(docs) * (L - 1)  # some pads, drawn per document
    assert p.n_val == round(n // T * 0.25) and p.tokens == sum(mask)


def test_absurd_lr_keeps_no_diverged_checkpoint(block, corpus, tmp_path):
    """lr 1e30 from the first step: the run stops in one line, keeps no checkpoint of huge weights, and its advice
    (resume with a lower --lr, or start again when nothing was kept) works."""
    out = tmp_path / "run"
    with pytest.raises(BlockformerError, match="--lr") as e:
        uptrain(UptrainConfig(str(block), str(corpus), out, seq_len=32, batch_size=2, max_steps=30,
                              lr=1e30, warmup_steps=1, save_every=1, grad_clip=0.0))
    assert "\n" not in str(e.value)
    resume = "--resume" in str(e.value)
    if not resume:
        assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []
    s = uptrain(UptrainConfig(str(block), str(corpus), out, seq_len=32, batch_size=2, max_steps=3, lr=1e-4,
                              warmup_steps=1, resume=resume))
    assert s["step"] == 3 and all(math.isfinite(x) for x in losses(out))


def assert_finite_checkpoint(ckpt):
    from safetensors.torch import load_file
    weights = load_file(ckpt / "model.safetensors")
    assert all(torch.isfinite(w).all() and w.abs().max() < 1e3 for w in weights.values()), ckpt
    step = int(ckpt.name.split("-")[1])
    rec = [r for r in map(json.loads, (ckpt.parent.parent / "metrics.jsonl").read_text().splitlines())
           if r["step"] == step]
    assert rec and all(math.isfinite(r.get("val_loss", 0.0)) for r in rec), rec


def test_divergence_keeps_the_last_finite_checkpoint_and_the_advice_works(block, corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = dict(seq_len=32, batch_size=2, max_steps=8, save_every=2, eval_every=4, warmup_steps=2, lr=1e-3)
    monkeypatch.setenv("BLOCKFORMER_LR_SPIKE_AT_STEP", "5")  # the update of step 5 blows the weights up
    with pytest.raises(BlockformerError, match="--resume --lr 0.0001") as e:
        uptrain(UptrainConfig(str(block), str(corpus), out, **cfg))
    assert "step-4" in str(e.value)
    kept = sorted((out / "checkpoints").glob("step-*"))
    assert [p.name for p in kept] == ["step-2", "step-4"]
    for ckpt in kept:
        assert_finite_checkpoint(ckpt)
    monkeypatch.delenv("BLOCKFORMER_LR_SPIKE_AT_STEP")
    r = run_cli(block, "--data", corpus, "--out", out, *COMMON, "--resume", "--lr", "1e-4")  # the advice, as given
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(losses(out)) == 8 and all(math.isfinite(x) for x in losses(out))


@pytest.mark.parametrize("setup,args,msg", [
    ("empty", [], "holds no text"),
    ("missing", [], "not found"),
    ("nofield", ["--text-field", "body"], "no field 'body'"),
    ("exists", [], "already exists"),
    ("nobudget", [], "set a budget"),
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


def test_several_data_sources_are_pooled(block, corpus, tmp_path):
    """--data twice: the documents of both are packed together (the summary counts them); a bad entry is one line."""
    extra = tmp_path / "extra.jsonl"
    extra.write_text("".join(json.dumps({"text": f"w{i} w{i + 1} w{i + 2} " * 20}) + "\n" for i in range(4, 40)))
    n_corpus, n_extra = len(read_documents(str(corpus))), len(read_documents(str(extra)))
    r = CliRunner().invoke(main, ["uptrain", str(block), "--data", str(corpus), "--data", str(extra),
                                  "--out", str(tmp_path / "o"), "--seq-len", "32", "--max-steps", "1"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["documents"] == n_corpus + n_extra
    assert json.loads((tmp_path / "o" / "uptrain_config.json").read_text())["data"] == [str(corpus), str(extra)]
    assert f"`{corpus}` + `{extra}`" in (tmp_path / "o" / "model" / "README.md").read_text()
    with pytest.raises(BlockformerError, match="must name a file"):
        UptrainConfig(str(block), (str(corpus), ""), tmp_path / "p", max_steps=1).check()


def test_teacher_with_another_tokenizer_is_refused(block, corpus, tiny_dirs, tmp_path):
    other = save_with_other_tokenizer(tiny_dirs["llama"], tmp_path / "teacher")
    with pytest.raises(BlockformerError, match="different tokenizer"):
        uptrain(UptrainConfig(str(block), str(corpus), tmp_path / "run", teacher=str(other), max_steps=1))


def test_seq_len_is_rounded_up_to_the_block_length(block, corpus, tmp_path):
    r = CliRunner().invoke(main, ["uptrain", str(block), "--data", str(corpus), "--out", str(tmp_path / "o"),
                                  "--seq-len", "30", "--max-steps", "1", "--batch-size", "2"])
    assert r.exit_code == 0 and "rounded up to 32" in r.output
    assert json.loads((tmp_path / "o" / "uptrain_config.json").read_text())["seq_len"] == 32  # and trained so


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


# ------------------------------------------------------------------ checkpoints: no pickle, damage, overwrite, disk
SMALL = dict(seq_len=32, batch_size=2, save_every=2, eval_every=2, warmup_steps=2, lr=1e-3)


class Payload:
    """Unpickling this creates a marker file: what a planted checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path
        return (Path.touch, (Path(self.marker),))


def test_resume_never_unpickles_a_planted_file(block, corpus, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "payload-ran"
    uptrain(UptrainConfig(str(block), str(corpus), out, max_steps=2, **SMALL))
    for step in (2, 9):  # beside the real checkpoint, and as a newer one
        (out / "checkpoints" / f"step-{step}").mkdir(exist_ok=True)
        planted = out / "checkpoints" / f"step-{step}" / "state.pt"
        torch.save({"model": Payload(marker), "state": Payload(marker)}, planted)
    assert not marker.exists()
    s = uptrain(UptrainConfig(str(block), str(corpus), out, max_steps=4, resume=True, **SMALL))
    assert s["step"] == 4 and not marker.exists()


def test_resume_tolerates_a_metrics_line_cut_short(block, corpus, tmp_path):
    out = tmp_path / "run"
    uptrain(UptrainConfig(str(block), str(corpus), out, max_steps=2, **SMALL))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 4.1')  # killed (or disk full) in the middle of the append
    uptrain(UptrainConfig(str(block), str(corpus), out, max_steps=3, resume=True, **SMALL))
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(block, corpus, tmp_path):
    from blockformer.uptrain.train import latest_checkpoint
    ref, out = tmp_path / "ref", tmp_path / "run"
    uptrain(UptrainConfig(str(block), str(corpus), ref, max_steps=6, **SMALL))
    uptrain(UptrainConfig(str(block), str(corpus), out, max_steps=4, **SMALL))
    f = out / "checkpoints" / "step-4" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # cut short, as by a crash without fsync
    assert latest_checkpoint(out).name == "step-2"
    uptrain(UptrainConfig(str(block), str(corpus), out, max_steps=6, resume=True, **SMALL))
    assert losses(out) == pytest.approx(losses(ref), rel=1e-6, abs=1e-7)


def test_overwrite_replaces_the_old_run_only_on_success(block, corpus, tmp_path, monkeypatch):
    import blockformer.uptrain.train as train
    out = tmp_path / "run"
    uptrain(UptrainConfig(str(block), str(corpus), out, max_steps=2, **SMALL))
    before = (out / "summary.json").read_text()

    def fail(*args, **kwargs):
        raise BlockformerError("injected failure in the first step")
    monkeypatch.setattr(train, "step_losses", fail)
    with pytest.raises(BlockformerError, match="injected"):
        uptrain(UptrainConfig(str(block), str(corpus), out, max_steps=3, overwrite=True, **SMALL))
    assert (out / "summary.json").read_text() == before           # the old run is intact
    assert [p.name for p in tmp_path.iterdir()] == ["run"]          # and nothing half-made beside it
    monkeypatch.undo()
    uptrain(UptrainConfig(str(block), str(corpus), out, max_steps=1, overwrite=True, **SMALL))
    assert json.loads((out / "summary.json").read_text())["steps"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_an_unwritable_out_is_one_line(block, corpus, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    r = CliRunner().invoke(main, ["uptrain", str(block), "--data", str(corpus), "--out", str(blocker / "run"),
                                  "--max-steps", "1", "--seq-len", "32"])
    assert r.exit_code == 1 and "cannot write" in r.output and "Traceback" not in r.output, r.output


def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_previous_one(block, corpus, tmp_path, monkeypatch):
    import blockformer.uptrain.checkpoints as ck
    real, calls = ck.save_file, []

    def disk_full(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 3:  # the second checkpoint's first file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, path, *args, **kwargs)
    monkeypatch.setattr(ck, "save_file", disk_full)
    out = tmp_path / "run"
    with pytest.raises(BlockformerError, match="No space left on device.*step-2 is kept") as e:
        uptrain(UptrainConfig(str(block), str(corpus), out, max_steps=4, **SMALL))
    assert "\n" not in str(e.value)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"] and ck.readable(out / "checkpoints/step-2")


def test_fsdp_state_is_gathered_on_every_rank_and_written_by_the_main_one(block, tmp_path, monkeypatch):
    """Without FSDP on CPU: a fake accelerator checks the code path (gather on all ranks, write on main)."""
    import torch.distributed.checkpoint.state_dict as dcp
    from accelerate.utils import DistributedType
    from safetensors.torch import load_file
    import blockformer.uptrain.train as train
    from blockformer.uptrain.checkpoints import RunFolder
    model = load_block(block)
    opt = torch.optim.AdamW(model.parameters())
    calls = []

    class FakeFSDP:
        distributed_type, num_processes, device = DistributedType.FSDP, 2, torch.device("cpu")

        def __init__(self, main):
            self.is_main_process = main

        def get_state_dict(self, m):  # the gathered full weights: marked, to see that they are what is saved
            calls.append(("model", self.is_main_process))
            return {k: v + 1 for k, v in m.state_dict().items()}

        def unwrap_model(self, m):
            return m

        def wait_for_everyone(self):
            pass
    monkeypatch.setattr(dcp, "get_optimizer_state_dict",
                        lambda m, o, options: calls.append(("optimizer", options.full_state_dict)) or o.state_dict())
    cfg = UptrainConfig(str(block), "d", tmp_path / "run", max_steps=1)
    state = {"step": 1, "tokens": 0, "train_seconds": 0.0, "history": []}
    cfg.out.mkdir()
    for main_rank in (False, True):
        folder = RunFolder(cfg.out, fresh=False, main=main_rank)
        train.checkpoint(cfg, FakeFSDP(main_rank), model, opt, state, folder)
        assert train.final_model(cfg, FakeFSDP(main_rank), model) is None or main_rank
    assert calls == [("model", False), ("optimizer", True), ("model", False),
                     ("model", True), ("optimizer", True), ("model", True)]
    saved = load_file(tmp_path / "run/checkpoints/step-1/model.safetensors")
    ref = model.state_dict()
    assert torch.allclose(saved["embedder.proj.weight"], ref["embedder.proj.weight"] + 1)
    final = train.final_model(cfg, FakeFSDP(True), model)
    assert torch.allclose(final.state_dict()["embedder.proj.weight"], ref["embedder.proj.weight"] + 1)


SKEWED_CLOCK = """
import os, sys, time
if os.environ.get("RANK") == "1":  # this process's clock runs 50 times fast
    real = time.perf_counter
    time.perf_counter = lambda: real() * 50
from blockformer.cli import main
main(sys.argv[1:], prog_name="blockformer")
"""


def test_two_process_ddp_agrees_when_max_time_is_up(block, corpus, tmp_path):
    script, out = tmp_path / "skewed.py", tmp_path / "run"
    script.write_text(SKEWED_CLOCK)
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
                        "uptrain", str(block), "--out", str(out), "--data", str(corpus), "--seq-len", "32",
                        "--batch-size", "2", "--max-time", "4s", "--warmup-steps", "1"],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == len(losses(out)) >= 1


def test_gradient_accumulation_matches_one_bigger_batch(block, corpus, tmp_path):
    for name, bs, accum in (("one", 2, 1), ("two", 1, 2)):
        uptrain(UptrainConfig(str(block), str(corpus), tmp_path / name, seq_len=32, batch_size=bs, grad_accum=accum,
                              max_steps=1, warmup_steps=1, lr=1e-2, precision="fp32"))
    a, b, orig = (load_block(x).state_dict() for x in (tmp_path / "one/model", tmp_path / "two/model", block))
    assert not torch.equal(a["embedder.proj.weight"], orig["embedder.proj.weight"])
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# ------------------------------------------------------------------ options: one line each
@pytest.mark.parametrize("args,msg", [
    (["--lr", "0"], "lr (--lr) must be > 0 (got 0"),
    (["--lr", "-1"], "lr (--lr) must be > 0 (got -1"),
    (["--batch-size", "0"], "batch_size (--batch-size) must be >= 1 (got 0)"),
    (["--seq-len", "-4"], "seq_len (--seq-len) must be >= 1"),
    (["--save-every", "0"], "save_every (--save-every) must be >= 1"),
    (["--eval-every", "-1"], "eval_every (--eval-every) must be >= 1"),
    (["--grad-accum", "0"], "grad_accum (--grad-accum) must be >= 1"),
    (["--keep-last", "0"], "keep_last (--keep-last) must be >= 1"),
    (["--max-time", ""], "max_time (--max-time) must be a positive duration"),
    (["--max-time", "-5m"], "max_time (--max-time) must be a positive duration"),
    (["--max-steps", "-1"], "max_steps (--max-steps) must be >= 1 (got -1)"),
    (["--max-tokens", "0"], "max_tokens (--max-tokens) must be >= 1"),
    (["--temperature", "0"], "temperature (--temperature) must be > 0"),
    (["--kd-weight", "1.5"], "kd_weight (--kd-weight) must be between 0 and 1"),
    (["--align-weight", "-1"], "align_weight (--align-weight) must be >= 0"),
    (["--align-weight", "0.5"], "needs a teacher"),
    (["--freeze", "embedder,decoder"], "unknown part 'decoder'"),
    (["--freeze", "embedder.nope"], "'embedder.nope' names no part"),
    (["--warmup-steps", "-1"], "warmup_steps (--warmup-steps) must be >= 0"),
])
def test_bad_options_are_one_line(block, corpus, tmp_path, args, msg):
    r = CliRunner().invoke(main, ["uptrain", str(block), "--data", str(corpus), "--out", str(tmp_path / "o"),
                                  "--seq-len", "32", "--max-steps", "1", *args])
    assert r.exit_code == 1 and msg in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


@pytest.mark.parametrize("field,value,msg", [
    ("freeze", (1, 2), "freeze (--freeze) must be a list of part names"),
    ("freeze", "embedder", "freeze (--freeze) must be a list of part names"),
    ("val_fraction", 0.0, "val_fraction must be between 0 and 1"),
    ("val_fraction", 1.0, "val_fraction must be between 0 and 1"),
    ("warmup_steps", -2, "warmup_steps (--warmup-steps) must be >= 0"),
    ("max_tokens", -5, "max_tokens (--max-tokens) must be >= 1"),
    ("lr", float("nan"), "lr (--lr) must be a finite number"),
    ("batch_size", 2.5, "batch_size (--batch-size) must be an integer"),
])
def test_config_check_is_the_one_place_for_option_checks(field, value, msg):
    """What recipes get too: UptrainConfig.check() names the field (and its flag)."""
    from pathlib import Path
    with pytest.raises(BlockformerError) as e:
        UptrainConfig("m", "d", Path("o"), max_steps=1, **{field: value}).check()
    assert msg in str(e.value)


@pytest.mark.parametrize("flags,want", [("avx512f avx512_bf16", False), ("avx512_bf16 amx_bf16 amx_tile", True),
                                        ("sse4_2", False)])
def test_auto_precision_is_bf16_on_a_cpu_only_with_amx(monkeypatch, flags, want):
    """AVX512-BF16 without AMX trained slower in bf16 than fp32 (docs/uptraining.md): `auto` must not pick it."""
    from blockformer import machine
    from blockformer.uptrain import train
    monkeypatch.setattr(machine, "cpuinfo", lambda: f"flags\t\t: fpu {flags}\n")
    cfg = UptrainConfig("m", "d", "o", precision="auto")
    assert train.autocast(cfg, torch.device("cpu")).fast_dtype == torch.bfloat16
    assert train.autocast(cfg, torch.device("cpu"))._enabled is want
    assert train.autocast(UptrainConfig("m", "d", "o", precision="bf16"), torch.device("cpu"))._enabled
