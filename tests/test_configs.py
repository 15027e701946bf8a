"""Every YAML in configs/ parses, matches its preset and recipe; the CLI prints complete configs."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest
import yaml

from mom_lit import MoMConfig
from mom_lit.training.cli import MoMLightningCLI, cli_main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Overlays change a few fields of a full config and are only meaningful on top of it.
OVERLAYS = {"gdn_340m.yaml": "mom_340m.yaml", "ddp.yaml": "mom_340m.yaml", "fsdp.yaml": "mom_1.3b.yaml",
            "fsdp2.yaml": "mom_1.3b.yaml", "code_100m_gdn.yaml": "code_100m.yaml"}
PAPER_TOKENS_PER_STEP = 524_288  # ~0.5M: 256 rows of 2048 tokens


class ParseOnly(MoMLightningCLI):
    """Parses and validates a config without building the trainer, model or data."""

    def instantiate_classes(self) -> None:
        pass


def parse(*names: str, extra: tuple[str, ...] = ()):
    args = [a for name in names for a in ("--config", str(CONFIGS / name))] + list(extra)
    return ParseOnly(args=args, run=False).config


def model_config(cfg, vocab_size: int = 320) -> MoMConfig:
    """The validated model config (``vocab_size`` is linked from the data module at instantiation)."""
    return MoMConfig(**{**vars(cfg.model.config), "vocab_size": vocab_size})


def config_stack(name: str) -> tuple[str, ...]:
    return (OVERLAYS[name], name) if name in OVERLAYS else (name,)


ALL_YAMLS = sorted(p.name for p in CONFIGS.glob("*.yaml"))


def test_configs_folder_has_the_expected_files():
    assert {"quickstart.yaml", "mqar.yaml", "mom_340m.yaml", "mom_1.3b.yaml", "gdn_340m.yaml", "ddp.yaml",
            "fsdp.yaml"} <= set(ALL_YAMLS)
    assert set(OVERLAYS) <= set(ALL_YAMLS)


@pytest.mark.parametrize("name", ALL_YAMLS)
def test_every_config_parses_and_builds_a_valid_model_config(name):
    cfg = parse(*config_stack(name))
    model_config(cfg)  # runs MoMConfig's validation
    assert cfg.data.class_path.startswith("mom_lit.data.")
    assert cfg.trainer.logger is not None
    callbacks = {c.class_path.rsplit(".", 1)[-1] for c in cfg.trainer.callbacks}
    assert {"ModelCheckpoint", "LearningRateMonitor", "RoutingStatsCallback"} <= callbacks
    assert "vocab_size" not in vars(cfg.model.config)  # linked, never written by hand


@pytest.mark.parametrize("names,preset", [
    (("quickstart.yaml",), "quickstart"), (("mom_340m.yaml",), "mom_340m"),
    (("mom_340m.yaml", "gdn_340m.yaml"), "gdn_340m"), (("mom_1.3b.yaml",), "mom_1.3b"),
])
def test_configs_match_their_presets(names, preset):
    cfg = model_config(parse(*names))
    expected = MoMConfig.from_preset(preset)
    for field in dataclasses.fields(MoMConfig):
        if field.name not in ("vocab_size",):
            assert getattr(cfg, field.name) == getattr(expected, field.name), field.name


@pytest.mark.parametrize("names", [
    ("mom_340m.yaml",), ("mom_340m.yaml", "gdn_340m.yaml"), ("mom_1.3b.yaml",), ("mom_340m.yaml", "ddp.yaml"),
    ("mom_1.3b.yaml", "fsdp.yaml"), ("mom_1.3b.yaml", "fsdp2.yaml"),
], ids=lambda n: "+".join(n))
def test_paper_recipe(names):
    cfg = parse(*names)
    t, m, d = cfg.trainer, cfg.model, cfg.data.init_args
    assert (m.lr, tuple(m.betas), m.weight_decay, m.warmup_steps, m.min_lr_ratio) == (3e-4, (0.9, 0.95), 0.01,
                                                                                        1024, 0.1)
    assert (t.gradient_clip_val, t.precision, d.seq_len) == (1.0, "bf16-mixed", 2048)
    assert d.batch_size * t.accumulate_grad_batches * t.devices * t.num_nodes * d.seq_len == PAPER_TOKENS_PER_STEP
    if "fsdp2.yaml" in names:  # Lightning refuses a mesh that does not cover every rank
        strategy = t.strategy.init_args
        assert strategy.data_parallel_size * strategy.tensor_parallel_size == t.devices * t.num_nodes
    mc = model_config(cfg, vocab_size=32000)
    assert (mc.num_layers, mc.num_heads, mc.head_dim, mc.aux_loss_coef, mc.aux_loss_type) == (24, 4, 256, 0.01,
                                                                                              "per_layer")


def test_code_100m_pair_differs_only_in_the_memories():
    mom = model_config(parse("code_100m.yaml"), vocab_size=16384)
    gdn = model_config(parse("code_100m.yaml", "code_100m_gdn.yaml"), vocab_size=16384)
    assert (mom.num_memories, mom.topk, mom.shared_memory, mom.aux_loss_type) == (4, 2, True, "per_layer")
    assert (gdn.num_memories, gdn.topk, gdn.shared_memory, gdn.has_router) == (1, 1, False, False)
    differing = {f.name for f in dataclasses.fields(MoMConfig) if getattr(mom, f.name) != getattr(gdn, f.name)}
    assert differing == {"num_memories", "topk", "shared_memory"}
    # Head dims the Triton scan runs in bf16 (powers of two from 64).
    assert mom.head_dim in (64, 128, 256) and mom.head_v_dim == mom.head_dim
    assert parse("code_100m.yaml").data.init_args.seq_len == 2048


def test_mqar_baseline_override_has_the_same_state_size():
    """The single-memory command documented in mqar.yaml keeps the recurrent state size of the MoM model."""
    header = (CONFIGS / "mqar.yaml").read_text()
    command = re.search(r"python -m mom_lit fit (.*?\\\n.*?)\n", header).group(1).replace("\\\n", " ")
    args = [a for a in shlex.split(command) if a.startswith("--model.") or a.startswith("--trainer.")]
    mom = model_config(parse("mqar.yaml"), vocab_size=8192)
    baseline = model_config(parse("mqar.yaml", extra=tuple(args)), vocab_size=8192)

    def state(c: MoMConfig) -> int:
        return c.num_streams * c.num_heads * c.head_dim * c.head_v_dim

    assert baseline.num_memories == 1 and not baseline.has_router and mom.has_router
    assert state(baseline) == state(mom)


def test_command_line_overrides_any_field():
    cfg = parse("quickstart.yaml", extra=("--trainer.max_steps=7", "--model.config.num_layers=1",
                                          "--model.lr=0.01", "--data.init_args.seq_len=64"))
    assert (cfg.trainer.max_steps, cfg.model.config.num_layers, cfg.model.lr, cfg.data.init_args.seq_len) == (
        7, 1, 0.01, 64)
    with pytest.raises(SystemExit):
        parse("quickstart.yaml", extra=("--model.config.vocab_size=100",))  # linked: not settable


def test_print_config_is_complete_and_round_trips(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(args=["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--print_config"])
    printed = capsys.readouterr().out
    values = yaml.safe_load(printed)
    fields = {f.name for f in dataclasses.fields(MoMConfig)} - {"vocab_size"}
    assert set(values["model"]["config"]) == fields
    assert {"lr", "betas", "eps", "weight_decay", "warmup_steps", "min_lr_ratio", "compile",
            "activation_checkpointing"} <= set(values["model"])
    assert values["data"]["class_path"] == "mom_lit.data.TextDataModule"
    assert values["trainer"]["max_steps"] == 250
    (tmp_path / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        cli_main(args=["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == values


def test_vocab_size_is_linked_from_the_data_module():
    cli = cli_main(args=["--config", str(CONFIGS / "quickstart.yaml"), "--trainer.logger=false",
                         "--trainer.callbacks=[]", "--model.config.num_layers=1"], run=False)
    assert cli.model.config.vocab_size == cli.datamodule.vocab_size == 320
    assert cli.model.model.embed.num_embeddings == 320
