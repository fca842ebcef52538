"""The recovery lab (bench/recovery_lab.py, blockformer/lab/) end to end on its micro preset: a tiny vanilla
model, a few thousand tokens, two methods; then resumed."""
from __future__ import annotations

import json
import math
import importlib.util
from pathlib import Path

import pytest

from blockformer.errors import BlockformerError
from blockformer.lab import preset, run_lab

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("recovery_lab", ROOT / "bench" / "recovery_lab.py")
recovery_lab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recovery_lab)


def finite_numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from finite_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from finite_numbers(v)
    elif isinstance(obj, float):
        yield obj


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    cfg = preset("micro", tmp_path_factory.mktemp("lab") / "lab", threads=1)
    first = run_lab(cfg)
    return cfg, first


def test_lab_runs_every_stage_and_writes_its_outputs(lab):
    cfg, first = lab
    assert set(first["stages"].values()) == {"ran"}
    assert {"data", "vanilla", "convert-paper-partition", "scratch", "up-ce-b5-s0", "up-ce-b5-s1", "up-ce-b25-s0",
            "up-staged_kd-b25-s0"} <= set(first["stages"])
    report = json.loads((cfg.out / "lab.json").read_text())
    losses = list(finite_numbers({k: report[k] for k in ("vanilla", "scratch", "converted", "table", "runs")}))
    assert losses and all(math.isfinite(x) for x in losses)
    assert set(report["table"]["main"]) == {"ce", "staged_kd"}
    assert set(report["table"]["main"]["ce"]) == {"b5", "b25"}
    assert len(report["table"]["seeds"]["ce"]) == 2  # two seeds at the smallest budget
    # every method spends exactly its budget, and the CE curve starts at the converted model's loss
    for r in report["runs"]:
        assert r["tokens"] == cfg.budget_tokens(r["budget"]) and r["curve"][-1]["tokens"] == r["tokens"]
    ce = next(r for r in report["runs"] if r["method"] == "ce" and r["budget"] == 0.25)
    assert ce["curve"][0] == {"tokens": 0, "val_loss": report["converted"]["paper-partition"]["val_loss"]}
    assert len(ce["curve"]) > 2  # intermediate checkpoints were scored
    assert (cfg.out / "fig5a.png").stat().st_size > 1000
    assert "| ce |" in (cfg.out / "methods.md").read_text()
    # the validation text is never trained on: no held-out paragraph appears in the training chunks
    train = (cfg.out / "data" / "train.jsonl").read_text()
    val = [json.loads(x)["text"] for x in (cfg.out / "data" / "val.jsonl").read_text().splitlines()]
    probes = [p for v in val for p in v.split("\n\n") if len(p) > 200][:20]
    assert probes and not any(json.dumps(p)[1:-1] in train for p in probes)


def test_lab_resumed_skips_every_stage_and_redoes_only_a_missing_one(lab):
    cfg, first = lab
    again = run_lab(preset("micro", cfg.out, threads=1))
    assert set(again["stages"]) == set(first["stages"]) and set(again["stages"].values()) == {"skipped"}
    (cfg.out / "stages" / "up-ce-b25-s0.json").unlink()
    third = run_lab(preset("micro", cfg.out, threads=1))
    assert [k for k, v in third["stages"].items() if v == "ran"] == ["up-ce-b25-s0"]
    assert third["table"]["main"]["ce"]["b25"] == pytest.approx(first["table"]["main"]["ce"]["b25"], abs=1e-6)


def test_lab_extended_with_another_method_runs_only_its_stages(lab):
    cfg, first = lab
    more = run_lab(preset("micro", cfg.out, threads=1, methods=("ce", "staged_kd", "kd")))
    ran = sorted(k for k, v in more["stages"].items() if v == "ran")
    assert ran == ["up-kd-b25-s0", "up-kd-b5-s0", "up-kd-b5-s1"]
    assert more["table"]["main"]["ce"] == first["table"]["main"]["ce"] and "kd" in more["table"]["main"]
    for k in ran:  # the folder is left as the fixture made it for the other tests
        (cfg.out / "stages" / f"{k}.json").unlink()


def test_lab_refuses_a_folder_with_other_options_or_of_another_kind(lab, tmp_path):
    cfg, _ = lab
    with pytest.raises(BlockformerError, match="other options"):
        run_lab(preset("micro", cfg.out, tokens=8192))
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(BlockformerError, match="not a lab folder"):
        run_lab(preset("micro", tmp_path))
    assert (tmp_path / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("args, message", [(["--methods", "ce,nope"], "unknown method(s) nope"),
                                          (["--budgets", "0.01,2"], "budgets must be shares"),
                                          (["--budgets", "x"], "--budgets must be comma-separated")])
def test_lab_cli_bad_options_are_one_line_errors(tmp_path, capsys, args, message):
    rc = recovery_lab.main(["--micro", "--out", str(tmp_path / "lab"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "lab").exists()


def test_spread_projection_keeps_a_mean_a_mean_and_maps_slots_by_hand():
    import torch
    from blockformer.lab.progressive import spread_projection
    D = 3
    eye = torch.eye(D)
    torch.testing.assert_close(spread_projection(torch.cat([eye / 2] * 2, 1), 2, 4), torch.cat([eye / 4] * 4, 1))
    w = torch.randn(D, 2 * D)
    a, b = w[:, :D], w[:, D:]
    torch.testing.assert_close(spread_projection(w, 2, 4), torch.cat([a / 2, a / 2, b / 2, b / 2], 1))


def test_reblocking_a_block_length_1_conversion_gives_the_block_length_4_conversion(tiny_dirs, tmp_path):
    """The paper's init at L_B = 1, re-blocked to 4, is the paper's init at 4: every weight equal."""
    import torch
    from safetensors.torch import load_file
    from blockformer.convert import ConvertConfig, convert
    from blockformer.lab.progressive import reblock
    from blockformer.model import BlockTransformerConfig
    convert(ConvertConfig(str(tiny_dirs["llama"]), tmp_path / "l1", block_length=1))
    convert(ConvertConfig(str(tiny_dirs["llama"]), tmp_path / "l4", block_length=4))
    reblock(tmp_path / "l1", tmp_path / "re", 4)
    got, want = load_file(tmp_path / "re" / "model.safetensors"), load_file(tmp_path / "l4" / "model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    conf = BlockTransformerConfig.from_pretrained(tmp_path / "re")
    assert conf.block_length == 4 and conf.provenance["reblocked_from"] == 1
    assert (tmp_path / "re" / "tokenizer.json").is_file() or (tmp_path / "re" / "tokenizer_config.json").is_file()


def test_progressive_method_trains_each_block_length_and_ends_at_the_labs(lab):
    import torch
    from blockformer.lab.config import LabConfig  # noqa: F401 - the preset below checks the step count
    from blockformer.lab.methods import METHODS, phases
    from blockformer.model import BlockTransformerConfig
    cfg, _ = lab
    more = run_lab(preset("micro", cfg.out, threads=1, methods=("progressive",), budgets=(0.25,), seeds=1))
    assert more["stages"]["convert-paper-partition-L1"] == "ran" and more["stages"]["up-progressive-b25-s0"] == "ran"
    root = cfg.out / "uptrain" / "progressive-b25-s0"
    lengths = [BlockTransformerConfig.from_pretrained(root / f"phase{k}" / "model").block_length for k in (1, 2, 3)]
    assert lengths == [1, 2, 4]
    split = phases(cfg, METHODS["progressive"], cfg.budget_tokens(0.25))
    assert sum(n for n, _ in split) == cfg.budget_tokens(0.25) and len(split) == 3
    summaries = [json.loads((root / f"phase{k}" / "summary.json").read_text()) for k in (1, 2, 3)]
    assert [s["tokens"] for s in summaries] == [n for n, _ in split]
    assert math.isfinite(more["table"]["main"]["progressive"]["b25"])
    for k in ("convert-paper-partition-L1", "up-progressive-b25-s0"):
        (cfg.out / "stages" / f"{k}.json").unlink()


def test_progressive_method_refuses_a_budget_with_fewer_steps_than_block_lengths_or_another_end(tmp_path):
    with pytest.raises(BlockformerError, match="needs a step per block length"):
        run_lab(preset("micro", tmp_path / "lab", methods=("progressive",), budgets=(0.01,)))
    with pytest.raises(BlockformerError, match="must end at the lab's block length 8"):
        run_lab(preset("micro", tmp_path / "lab", methods=("progressive",), block_length=8))
    assert not (tmp_path / "lab").exists()


def test_interrupted_pretraining_resumes_to_the_same_weights(lab, tmp_path, monkeypatch):
    import torch
    from transformers import AutoTokenizer
    from blockformer.lab import train as T
    from blockformer.lab.run import Lab
    cfg, _ = lab
    data = Lab(cfg)
    rows, val = data.train_rows(), data.val()
    tok = AutoTokenizer.from_pretrained(cfg.out / "data" / "tokenizer")
    full = T.vanilla_model(cfg, tok)
    T.pretrain(full, rows, val, cfg, tmp_path / "a", "a")
    real, steps = T.lm_loss, {"n": 0}

    def interrupted(model, ids, reduction="mean"):
        steps["n"] += model.training  # training steps only; validation calls it in eval mode
        if steps["n"] == 21:
            raise KeyboardInterrupt
        return real(model, ids, reduction)

    monkeypatch.setattr(T, "lm_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        T.pretrain(T.vanilla_model(cfg, tok), rows, val, cfg, tmp_path / "b", "b")
    monkeypatch.setattr(T, "lm_loss", real)
    from blockformer.uptrain.checkpoints import latest_checkpoint
    # a checkpoint every 5% of the run (here every step), not only at the log-spaced curve points
    assert latest_checkpoint(tmp_path / "b").name == "step-20"
    again = T.vanilla_model(cfg, tok)  # fresh weights, as a new process has
    state = T.pretrain(again, rows, val, cfg, tmp_path / "b", "b")
    assert state["step"] == cfg.pretrain_steps > 21
    for k, v in full.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
