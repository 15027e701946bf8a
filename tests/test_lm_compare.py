"""tools/lm_compare.py and tools/plot_lm_compare.py: the run plan from the configs, and run -> summarize -> plot
end to end through the real command line on a tiny model and byte-level data."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tools_import import load_tool

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lm_compare():
    return load_tool("lm_compare")


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory) -> Path:
    """A prepared byte-level corpus of 24 small documents (6 held out)."""
    from mom_lit.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = ["def", "return", "self", "value", "import", "class", "for", "in", "if", "x", "(", ")", ":"]
    for i in range(24):
        (root / "src").mkdir(exist_ok=True)
        (root / "src" / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words) for _ in range(rng.randint(100, 700))))
    prepare_dataset([str(root / "src")], root / "data", "byte", val_fraction=0.25, seed=0, num_workers=0,
                    verbose=False)
    return root / "data"


def test_plan_matches_the_code_100m_configs(lm_compare):
    mom = lm_compare.parse_fit_config(["--config", str(REPO / "configs/code_100m.yaml")])
    gdn = lm_compare.parse_fit_config(["--config", str(REPO / "configs/code_100m.yaml"),
                                       "--config", str(REPO / "configs/code_100m_gdn.yaml")])
    for cfg in (mom, gdn):
        assert lm_compare.tokens_per_step(cfg) == 16 * 2048
        # 60M tokens are 1831.05 steps: rounded up to whole validation intervals of 100 steps.
        assert lm_compare.plan_steps(60e6, cfg) == (1900, 100)
    assert gdn.model.config.num_memories == 1 and mom.model.config.num_memories == 4


def test_run_refuses_bad_inputs_before_writing(lm_compare, byte_data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="no train/ split"):
        lm_compare.main(["run", "--variant", "mom", "--data", str(tmp_path), "--tokens", "1e3", "--out", str(out)])
    with pytest.raises(SystemExit, match="--tokens must be positive"):
        lm_compare.main(["run", "--variant", "mom", "--data", str(byte_data), "--tokens", "0", "--out", str(out)])
    assert not out.exists()
    out.mkdir()
    (out / "run.json").write_text("{}")
    with pytest.raises(SystemExit, match="already holds a run"):
        lm_compare.main(["run", "--variant", "gdn", "--data", str(byte_data), "--tokens", "1e3", "--out", str(out)])


def test_eval_length_reads_the_documents_of_a_prepared_split(byte_data):
    from mom_lit.data.prepare import read_meta
    from mom_lit.data.tokenizers import load_tokenizer
    from mom_lit.eval.length_cli import split_documents

    tokenizer = load_tokenizer("byte")
    meta = read_meta(byte_data / "val")
    docs = split_documents(byte_data / "val", tokenizer.eos_id)
    # Every stored block of 1024 tokens is read; a document ends with its EOS, except one cut by the last block.
    assert sum(map(len, docs)) == meta["num_tokens"] // 1024 * 1024
    assert all(d[-1] == tokenizer.eos_id for d in docs[:-1]) and len(docs) >= meta["num_documents"] - 1
    sources = {Path(p).read_text() for p in meta["sources"]}
    assert all(tokenizer.decode(d[:-1]) in sources for d in docs[:-1])


TINY = ["--trainer.accelerator=cpu", "--trainer.precision=32-true", "--model.config.hidden_size=32",
        "--model.config.num_layers=2", "--model.config.num_heads=2", "--model.config.head_dim=16",
        "--model.config.backend=eager", "--data.init_args.seq_len=32", "--data.init_args.batch_size=2",
        "--data.init_args.num_workers=0", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=2",
        "--trainer.log_every_n_steps=3", "--model.warmup_steps=1", "--trainer.enable_model_summary=false",
        # The config's callbacks with routing logged every 2 steps instead of 50 (no progress bar).
        "--trainer.callbacks=" + json.dumps([
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"save_top_k": 0, "save_last": True}},
            {"class_path": "mom_lit.callbacks.RoutingStatsCallback", "init_args": {"log_every_n_steps": 2}}]),
        "--trainer.enable_progress_bar=false"]


@pytest.mark.slow
def test_run_summarize_plot_end_to_end(lm_compare, byte_data, tmp_path, capsys):
    out = tmp_path / "mom"
    summary = lm_compare.main(["run", "--variant", "mom", "--data", str(byte_data), "--tokens", "200", "--seed", "0",
                               "--out", str(out), "--length-factor", "4", "--length-docs", "4", "--", *TINY])
    # 200 tokens at 2 x 32 per step: 3.1 steps, rounded up to 2 validation intervals of 2 steps. Training values
    # are logged every 3 steps only: the steps and tokens of the run come from its closing validation.
    assert (summary["steps_planned"], summary["steps"], summary["tokens"]) == (4, 4, 256)
    assert [tokens for tokens, _ in summary["val_loss"]] == [128, 256]
    assert [tokens for tokens, _ in summary["train_loss"]] == [192]
    assert summary["final_val_loss"] == summary["val_loss"][-1][1] < 6.0  # below uniform over 320 ids (5.77 + ...)
    params = summary["parameters"]
    assert params["active_per_token"] < params["total"]
    assert summary["config"]["aux_loss_type"] == "per_layer" and summary["tokens_per_sec"] > 0
    assert 0 < summary["tokens_per_sec_wall"] < summary["tokens_per_sec"]
    routing = summary["routing"]
    assert len(routing["max_min_ratio_per_layer"]) == 2 and routing["max_min_ratio_worst"] == max(
        routing["max_min_ratio_per_layer"])
    assert "--trainer.max_steps=4" in summary["command"] and summary["git"]["commit"]
    buckets = summary["length"]["buckets"]
    assert [b["stop"] for b in buckets] == [64, 128] and all(b["tokens"] > 0 for b in buckets)
    assert summary["length"]["meta"]["source"].startswith("prepared split")
    assert json.loads((out / "summary.json").read_text()) == summary

    # summarize rewrites the same summary from the run's files.
    again = lm_compare.main(["summarize", str(out), "--json", str(tmp_path / "again.json")])
    assert again == summary

    # A second seed of the same label (the same run relabelled as seed 1) and a run of another label: the table
    # has one row per label, with the seeds' mean and range and the difference from the first label per seed.
    plot = load_tool("plot_lm_compare")
    (tmp_path / "seed1.json").write_text(json.dumps({**summary, "seed": 1, "final_val_loss": 5.0}))
    (tmp_path / "other.json").write_text(json.dumps({**summary, "label": "other",
                                                     "final_val_loss": summary["final_val_loss"] + 0.25}))
    capsys.readouterr()
    plots = plot.main([str(out / "summary.json"), str(tmp_path / "seed1.json"), str(tmp_path / "other.json"),
                       "--out", str(tmp_path / "docs" / "lm")])
    assert [p.name for p in plots] == ["lm_loss.png", "lm_length.png"]
    assert all(p.stat().st_size > 10_000 for p in plots)
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    final = summary["final_val_loss"]
    assert [r[0].strip() for r in rows[1:]] == ["mom", "other"] and rows[1][2].strip() == "0,1"
    assert rows[1][4].strip() == f"{(final + 5.0) / 2:.4f} ({min(final, 5.0):.4f}-{max(final, 5.0):.4f})"
    assert rows[1][5].strip() == "-" and rows[2][5].strip() == "+0.2500"
    with pytest.raises(SystemExit, match="same seed 0"):
        plot.main([str(out / "summary.json"), str(tmp_path / "again.json"), "--out", str(tmp_path / "x")])
