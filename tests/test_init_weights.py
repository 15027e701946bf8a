"""A new training run from pretrained weights (``init_weights``), distinct from resuming with ``--ckpt_path``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mom_lit import MoMConfig
from mom_lit.interop import save_fla
from mom_lit.interop.init_weights import architecture_differences
from mom_lit.training import MoMLightningModule
from mom_lit.training.cli import cli_main
from test_interop import _config, _random_model
from test_training import TINY_QUICKSTART

pytestmark = pytest.mark.usefixtures("one_thread")


def _same_parameters(module: MoMLightningModule, model) -> bool:
    expected = model.state_dict()
    return all(torch.equal(t, expected[name]) for name, t in module.model.state_dict().items())


@pytest.mark.parametrize("layout", ["mom_lit", "fla", "mom_lit-bf16"])
def test_module_starts_from_the_directory_weights(tmp_path, layout):
    model = _random_model(_config())
    if layout == "fla":
        save_fla(model, tmp_path / "weights")
    else:
        model.save_pretrained(tmp_path / "weights", dtype=torch.bfloat16 if layout.endswith("bf16") else None)
    # The run's own kernel and training settings need not match the directory's.
    module = MoMLightningModule(_config(backend="compiled", chunk_size=16, aux_loss_coef=0.1),
                                init_weights=str(tmp_path / "weights"))
    if layout.endswith("bf16"):
        model = model.to(torch.bfloat16).float()
    assert _same_parameters(module, model)
    assert module.model.embed.weight.dtype == torch.float32
    assert module.model.lm_head.weight is module.model.embed.weight  # the tie survives the load
    assert getattr(module.model.blocks[0].attn.A_log, "_no_weight_decay", False)  # so does the decay plan
    assert "init_weights" not in module.hparams  # rebuilding a module from a checkpoint does not reread it
    assert MoMLightningModule(_config()).init_weights is None


def test_a_different_architecture_is_refused_naming_the_fields(tmp_path):
    _random_model(_config()).save_pretrained(tmp_path / "weights")
    with pytest.raises(ValueError) as info:
        MoMLightningModule(_config(hidden_size=48, num_memories=4, topk=1), init_weights=str(tmp_path / "weights"))
    message = str(info.value)
    assert f"init_weights {tmp_path / 'weights'} holds another architecture" in message
    assert "hidden_size: run 48, weights 32" in message
    assert "num_memories: run 4, weights 3" in message and "topk: run 1, weights 2" in message
    assert "num_layers" not in message
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        MoMLightningModule(_config(), init_weights=str(tmp_path / "nowhere"))


def test_architecture_differences_compare_derived_widths():
    by_ratio = MoMConfig(hidden_size=96, mlp_ratio=2.0)  # SwiGLU width 128
    assert architecture_differences(by_ratio, MoMConfig(hidden_size=96, intermediate_size=128)) == []
    assert architecture_differences(MoMConfig(head_dim=32, expand_v=2.0), MoMConfig(head_dim=32)) == \
        ["head_v_dim: run 64, weights 32"]
    # The gla gate's shape matters only where a gla rule is involved.
    assert architecture_differences(MoMConfig(gla_gate_rank=8), MoMConfig()) == []
    assert architecture_differences(MoMConfig(update_rule="gla", gla_gate_rank=8), MoMConfig(update_rule="gla")) \
        == ["gla_gate_rank: run 8, weights 16"]


def _tiny_quickstart_config(**overrides) -> MoMConfig:
    """The model of TINY_QUICKSTART (the byte tokenizer's 320 rows)."""
    values = dict(vocab_size=320, hidden_size=32, num_layers=2, num_heads=2, head_dim=8, num_memories=4, topk=2,
                  shared_memory=True, chunk_size=16, backend="eager")
    return MoMConfig(**{**values, **overrides})


@pytest.fixture
def bare_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["mom_lit"])


@pytest.mark.usefixtures("bare_argv")
def test_cli_fit_starts_a_new_run_from_init_weights(tmp_path):
    model = _random_model(_tiny_quickstart_config())
    weights = model.save_pretrained(tmp_path / "weights", tokenizer="byte")
    args = ["fit", *TINY_QUICKSTART, f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            "--trainer.max_steps=2", "--trainer.val_check_interval=2",
            "--model.init_weights", str(weights)]
    cli = cli_main(args[1:], run=False)  # without a subcommand: the classes are built, nothing runs
    assert _same_parameters(cli.model, model)  # loaded when the module is built, before the Trainer runs

    cli_main(args)
    checkpoint = torch.load(tmp_path / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt",
                            map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2  # a new run: steps count from 0
    assert checkpoint["init_weights"] == str(weights)
    trained = checkpoint["state_dict"]["model.embed.weight"]
    assert not torch.equal(trained, model.embed.weight)
    assert (trained - model.embed.weight).abs().max() < 0.1  # two small steps away from the given weights


@pytest.mark.usefixtures("bare_argv")
def test_cli_refuses_weights_of_another_architecture_before_writing(tmp_path, capsys):
    weights = _random_model(_tiny_quickstart_config(num_layers=3)).save_pretrained(tmp_path / "weights")
    with pytest.raises(SystemExit) as info:  # a usage error, in one line
        cli_main(["fit", *TINY_QUICKSTART, f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
                  "--model.init_weights", str(weights)])
    assert info.value.code not in (0, None)
    assert "num_layers: run 2, weights 3" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "runs").exists()
