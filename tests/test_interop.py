"""Checkpoint interop: fla directories (layout, config, round trips, refusals), Lightning .ckpt export, the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import lightning as L
import pytest
from tools_import import load_tool
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from mom_lit import MoMConfig, MoMForCausalLM
from mom_lit.interop import (config_from_fla, config_to_fla, export_lightning_checkpoint, load_checkpoint, load_fla,
                             load_lightning_checkpoint, load_pretrained, save_fla, save_pretrained,
                             state_dict_from_fla, state_dict_to_fla)
from mom_lit.training import MoMLightningModule

SEED = 42


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**overrides) -> MoMConfig:
    values = dict(vocab_size=61, hidden_size=32, num_layers=2, num_heads=2, head_dim=8, num_memories=3, topk=2,
                  shared_memory=True, intermediate_size=48, chunk_size=8, backend="eager")
    return MoMConfig(**{**values, **overrides})


def _random_model(config: MoMConfig, seed: int = SEED) -> MoMForCausalLM:
    """Every parameter random, norms and gates included, so that any misplaced tensor changes the logits."""
    torch.manual_seed(seed)
    model = MoMForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif p.dim() >= 2:
                p.normal_(std=0.3)
    return model.eval()


def _logits(model: MoMForCausalLM, seed: int = SEED) -> torch.Tensor:
    # One scan setting for every model compared: fla's config has none (a loaded one says auto, chunks of 64).
    model.configure_paths(backend="eager", chunk_size=8)
    ids = torch.randint(0, model.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


FLA_CONFIGS = [
    pytest.param(dict(), id="mom-shared"),
    pytest.param(dict(shared_memory=False, num_memories=4, topk=1, tie_embeddings=False), id="mom-routed-only"),
    pytest.param(dict(num_memories=1, topk=1, shared_memory=True, expand_v=2.0), id="mom-one-memory"),
    pytest.param(dict(num_memories=1, topk=1, shared_memory=False, expand_v=2.0), id="gdn"),
    pytest.param(dict(num_memories=1, topk=1, shared_memory=False, conv_size=0, use_output_gate=False,
                      tie_embeddings=False), id="gdn-no-conv-no-gate"),
]


@pytest.mark.parametrize("overrides", FLA_CONFIGS)
def test_fla_export_import_round_trip_is_exact(tmp_path, overrides):
    model = _random_model(_config(**overrides))
    save_fla(model, tmp_path)
    written = load_file(tmp_path / "model.safetensors")
    loaded, config = load_fla(tmp_path)
    # fla's config has no scan settings; everything else comes back.
    assert dataclasses.replace(config, chunk_size=8, backend="eager") == model.config
    assert torch.equal(_logits(loaded), _logits(model))
    # The fla tensors are what the export wrote, and re-export gives them back unchanged.
    again = state_dict_to_fla(loaded.state_dict(), config)
    assert again.keys() == written.keys()
    assert all(torch.equal(again[name], written[name]) for name in written)


# What fla 0.6.0's save_pretrained writes for two 1-layer models (read from fla itself): names and shapes.
FLA_MOM_LAYOUT = {
    "model.embeddings.weight": (61, 32), "lm_head.weight": (61, 32), "model.norm.weight": (32,),
    **{f"model.layers.0.{name}": shape for name, shape in {
        "attn_norm.weight": (32,), "mlp_norm.weight": (32,),
        "attn.A_log": (2,), "attn.dt_bias": (2,), "attn.gate.weight": (3, 32), "attn.q_proj.weight": (16, 32),
        **{f"attn.{p}_proj.{m}.weight": (16 if p in "kv" else 2, 32) for p in "kvab" for m in range(3)},
        **{f"attn.shared_{p}.weight": (16 if p in "kv" else 2, 32) for p in "kvab"},
        **{f"attn.{p}_conv1d.weight": (16, 1, 4) for p in "qkv"},
        "attn.g_proj.weight": (16, 32), "attn.o_norm.weight": (8,), "attn.o_proj.weight": (32, 16),
        "mlp.gate_proj.weight": (48, 32), "mlp.up_proj.weight": (48, 32), "mlp.down_proj.weight": (32, 48),
    }.items()},
}
FLA_GDN_LAYOUT = {  # expand_v 2, tied embeddings: no lm_head.weight
    "model.embeddings.weight": (61, 32), "model.norm.weight": (32,),
    **{f"model.layers.0.{name}": shape for name, shape in {
        "attn_norm.weight": (32,), "mlp_norm.weight": (32,),
        "attn.A_log": (2,), "attn.dt_bias": (2,), "attn.q_proj.weight": (16, 32), "attn.k_proj.weight": (16, 32),
        "attn.v_proj.weight": (32, 32), "attn.a_proj.weight": (2, 32), "attn.b_proj.weight": (2, 32),
        "attn.q_conv1d.weight": (16, 1, 4), "attn.k_conv1d.weight": (16, 1, 4), "attn.v_conv1d.weight": (32, 1, 4),
        "attn.g_proj.weight": (32, 32), "attn.o_norm.weight": (16,), "attn.o_proj.weight": (32, 32),
        "mlp.gate_proj.weight": (48, 32), "mlp.up_proj.weight": (48, 32), "mlp.down_proj.weight": (32, 48),
    }.items()},
}
# The config.json fields that fla 0.6.0 wrote for the same two models (transformers bookkeeping left out).
FLA_MOM_JSON = dict(model_type="mom", attn=None, attnres_block_size=None, aux_loss_scale=0.01, capacity=1.0,
                    conv_size=4, expand_v=1.0, head_dim=8, hidden_act="swish", hidden_ratio=4, hidden_size=32,
                    initializer_range=0.02, intermediate_size=48, mom_backend="gated_deltanet", norm_eps=1e-06,
                    num_heads=2, num_hidden_layers=1, num_memories=3, shared_mem=True, single_kv_proj=False,
                    tie_word_embeddings=False, topk=2, use_output_gate=True, use_short_conv=True, vocab_size=61)
FLA_GDN_JSON = dict(model_type="gated_deltanet", allow_neg_eigval=False, attn=None, attnres_block_size=None,
                    conv_size=4, expand_v=2.0, head_dim=8, hidden_act="swish", hidden_ratio=4, hidden_size=32,
                    initializer_range=0.02, intermediate_size=48, norm_eps=1e-06, num_heads=2, num_hidden_layers=1,
                    num_v_heads=None, output_gate_activation="swish", tie_word_embeddings=True, use_gate=True,
                    use_short_conv=True, vocab_size=61)
LAYOUT_CASES = [
    pytest.param(dict(num_layers=1, tie_embeddings=False), FLA_MOM_LAYOUT, FLA_MOM_JSON, id="mom"),
    pytest.param(dict(num_layers=1, num_memories=1, topk=1, shared_memory=False, expand_v=2.0), FLA_GDN_LAYOUT,
                 FLA_GDN_JSON, id="gated_deltanet"),
]


@pytest.mark.parametrize("overrides, layout, fla_json", LAYOUT_CASES)
def test_export_matches_fla_layout_and_config(tmp_path, overrides, layout, fla_json):
    model = _random_model(_config(**overrides))
    save_fla(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert {name: tuple(t.shape) for name, t in tensors.items()} == layout
    written = json.loads((tmp_path / "config.json").read_text())
    for field, value in fla_json.items():
        if field != "hidden_ratio":  # ours records the MLP ratio; the explicit intermediate_size decides
            assert written[field] == value, field
    # fla's own config.json resolves to the same model.
    assert config_from_fla(fla_json) == config_from_fla(written)


def test_export_puts_each_tensor_where_fla_reads_it():
    # A round trip cannot see a mistake made symmetrically in both directions; fla's meaning of each name can.
    model = _random_model(_config(num_layers=1, tie_embeddings=False))
    c, attn, mlp = model.config, model.blocks[0].attn, model.blocks[0].mlp
    fla = state_dict_to_fla(model.state_dict(), c)
    layer = "model.layers.0."
    for m in range(c.num_memories):  # routed memory m is fla's ModuleList entry m
        for proj in ("k_proj", "v_proj", "b_proj", "a_proj"):
            assert torch.equal(fla[f"{layer}attn.{proj}.{m}.weight"], getattr(attn, proj)[m])
    for proj in ("k", "v", "b", "a"):  # the shared memory is our last stream
        assert torch.equal(fla[f"{layer}attn.shared_{proj}.weight"], getattr(attn, f"{proj}_proj")[-1])
    assert torch.equal(fla[f"{layer}attn.gate.weight"], attn.router.weight)
    q, k, v = attn.conv_weight.split([c.key_dim, c.key_dim, c.value_dim])  # channel order of the fused conv
    for letter, part in zip("qkv", (q, k, v)):
        assert torch.equal(fla[f"{layer}attn.{letter}_conv1d.weight"][:, 0], part)
    gate, up = mlp.gate_up.weight.chunk(2)  # SwiGLU: silu(gate) * up
    assert torch.equal(fla[f"{layer}mlp.gate_proj.weight"], gate)
    assert torch.equal(fla[f"{layer}mlp.up_proj.weight"], up)
    assert torch.equal(fla[f"{layer}mlp.down_proj.weight"], mlp.down.weight)
    assert torch.equal(fla["model.embeddings.weight"], model.embed.weight)
    assert torch.equal(fla["lm_head.weight"], model.lm_head.weight)


@pytest.mark.parametrize("model_type", ["mom", "gated_deltanet"])
def test_fla_defaults_fill_absent_fields(model_type):
    # Hugging Face may write only the fields that differ from fla's defaults.
    config = config_from_fla({"model_type": model_type, "hidden_size": 96, "num_heads": 3, "head_dim": 32,
                              "num_hidden_layers": 2, "hidden_ratio": 3})
    assert config.intermediate_size == 256  # int(96 * 3 * 2/3) = 192, rounded up to a multiple of 256
    assert (config.vocab_size, config.norm_eps, config.conv_size, config.tie_embeddings) == (32000, 1e-6, 4, False)
    if model_type == "mom":
        assert (config.num_memories, config.topk, config.shared_memory, config.expand_v) == (4, 2, True, 1.0)
    else:
        assert (config.num_memories, config.topk, config.shared_memory, config.expand_v) == (1, 1, False, 2.0)


def test_sharded_fla_directory_loads(tmp_path):
    model = _random_model(_config(num_layers=3))
    save_fla(model, tmp_path / "single")
    tensors = load_file(tmp_path / "single" / "model.safetensors")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(sharded / shard))
        weight_map.update({n: shard for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    loaded, _ = load_fla(sharded)
    assert torch.equal(_logits(loaded), _logits(model))


UNSUPPORTED = [
    pytest.param(dict(model_type="mom", single_kv_proj=True), "single_kv_proj", id="single_kv_proj"),
    pytest.param(dict(model_type="mom", attn={"layers": [1], "num_heads": 2}), "hybrid attention", id="attn"),
    pytest.param(dict(model_type="mom", use_short_conv=False), "use_short_conv=False", id="mom-no-conv"),
    pytest.param(dict(model_type="mom", attnres_block_size=2), "attnres_block_size", id="attnres"),
    pytest.param(dict(model_type="gated_deltanet", allow_neg_eigval=True), "allow_neg_eigval", id="neg-eigval"),
    pytest.param(dict(model_type="gated_deltanet", num_heads=2, num_v_heads=4), "num_v_heads", id="gva"),
    pytest.param(dict(model_type="gated_deltanet", output_gate_activation="sigmoid"), "sigmoid", id="sigmoid"),
    pytest.param(dict(model_type="gated_deltanet", hidden_act="powlu"), "hidden_act", id="powlu"),
    pytest.param(dict(model_type="rwkv7"), "model_type", id="other-model"),
]


@pytest.mark.parametrize("fla_config, match", UNSUPPORTED)
def test_unsupported_fla_config_is_refused(tmp_path, fla_config, match):
    with pytest.raises(ValueError, match=match):
        config_from_fla(fla_config)
    (tmp_path / "config.json").write_text(json.dumps(fla_config))
    with pytest.raises(ValueError, match=match):
        load_fla(tmp_path)


def test_fla_parameters_must_match_exactly(tmp_path):
    model = _random_model(_config(num_layers=1))
    config = model.config
    tensors = state_dict_to_fla(model.state_dict(), config)
    extra = {**tensors, "model.layers.0.attn.q_conv1d.bias": torch.zeros(16)}
    with pytest.raises(ValueError, match="q_conv1d.bias"):
        state_dict_from_fla(extra, config, "mom")
    missing = {k: v for k, v in tensors.items() if k != "model.layers.0.attn.shared_v.weight"}
    with pytest.raises(ValueError, match="shared_v"):
        state_dict_from_fla(missing, config, "mom")
    wrong = {**tensors, "model.layers.0.mlp.up_proj.weight": torch.zeros(40, 32)}
    with pytest.raises(ValueError, match="gate_up"):
        _write_fla(tmp_path, config, wrong)
        load_fla(tmp_path)


def _write_fla(directory: Path, config: MoMConfig, tensors: dict[str, torch.Tensor]) -> None:
    (directory / "config.json").write_text(json.dumps(config_to_fla(config)))
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(directory / "model.safetensors"))


@pytest.mark.parametrize("overrides, model_type, match", [
    pytest.param(dict(update_rule="gla"), None, "gated delta rule", id="gla-rule"),
    pytest.param(dict(conv_size=0), "mom", "short convolution", id="mom-without-conv"),
    pytest.param(dict(), "gated_deltanet", "one memory", id="gdn-of-a-mixture"),
])
def test_export_refuses_what_fla_cannot_hold(tmp_path, overrides, model_type, match):
    with pytest.raises(ValueError, match=match):
        save_fla(_random_model(_config(**overrides)), tmp_path, model_type=model_type)


def test_missing_or_incomplete_directories_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_fla(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config_to_fla(_config())))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_fla(tmp_path)


# Lightning checkpoints and mom_lit directories --------------------------------------------------------------
class _TokenRows(L.LightningDataModule):
    def __init__(self, tokenizer: str = "byte", vocab_size: int = 61):
        super().__init__()
        self.save_hyperparameters()  # like TextDataModule: the checkpoint records the tokenizer

    def train_dataloader(self):
        ids = torch.randint(0, self.hparams.vocab_size, (4, 9), generator=torch.Generator().manual_seed(SEED))
        return DataLoader([{"input_ids": r[:-1], "labels": r[1:]} for r in ids], batch_size=2)


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory) -> Path:
    """A real checkpoint of one optimizer step of MoMLightningModule (tied embeddings, a tokenizer recorded)."""
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    torch.manual_seed(SEED)
    module = MoMLightningModule(_config(), warmup_steps=1)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, _TokenRows(tokenizer="gpt2-like/none"))
    trainer.save_checkpoint(path)
    return path


def test_lightning_checkpoint_to_directory_and_back(lightning_ckpt, tmp_path):
    reference, config = load_lightning_checkpoint(lightning_ckpt)
    out = export_lightning_checkpoint(lightning_ckpt, tmp_path / "plain")
    meta = json.loads((out / "config.json").read_text())
    assert meta["model_type"] == "mom_lit" and meta["architectures"] == ["MoMForCausalLM"]
    assert {k: meta[k] for k in config.to_dict()} == config.to_dict()  # flat, as Hugging Face configs are
    assert meta["tokenizer"] == "gpt2-like/none"  # a hub name stays a name
    assert "lm_head.weight" not in load_file(out / "model.safetensors")  # tied: stored once
    loaded, loaded_config = load_pretrained(out)
    assert loaded_config == config
    assert loaded.lm_head.weight is loaded.embed.weight
    assert torch.equal(_logits(loaded), _logits(reference))
    # The tensors are the trained ones, not a fresh initialisation.
    state = torch.load(lightning_ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert torch.equal(loaded.blocks[1].attn.k_proj, state["model.blocks.1.attn.k_proj"])
    via_any = load_checkpoint(lightning_ckpt)
    assert via_any.source == "lightning" and via_any.tokenizer == "gpt2-like/none"


def test_pretrained_directory_keeps_dtype_tokenizer_file_and_decay_flags(tmp_path):
    model = _random_model(_config(update_rule="gla", tie_embeddings=False))
    tokenizer = tmp_path / "tok" / "tokenizer.json"
    tokenizer.parent.mkdir()
    tokenizer.write_text("{}")
    out = save_pretrained(model, tmp_path / "plain", tokenizer=str(tokenizer), dtype=torch.bfloat16)
    assert (out / "tokenizer.json").read_text() == "{}"  # the directory is self-contained
    loaded, _ = load_pretrained(out, dtype=None)
    assert loaded.embed.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))
    assert getattr(loaded.blocks[0].attn.gk_bias, "_no_weight_decay", False)
    assert load_checkpoint(out).tokenizer == str(out / "tokenizer.json")


def test_lightning_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_lightning_checkpoint(tmp_path / "missing.ckpt")
    sharded = tmp_path / "sharded.ckpt"
    sharded.mkdir()
    with pytest.raises(ValueError, match="consolidate"):
        load_lightning_checkpoint(sharded)
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1.0}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="hyper_parameters\\['config'\\]"):
        load_lightning_checkpoint(tmp_path / "other.ckpt")


# The command line -------------------------------------------------------------------------------------------
def test_convert_cli_chain(lightning_ckpt, tmp_path, capsys):
    tool = load_tool("convert")
    reference, _ = load_lightning_checkpoint(lightning_ckpt)
    assert tool.main([str(lightning_ckpt), str(tmp_path / "plain")]) == 0
    assert tool.main([str(tmp_path / "plain"), str(tmp_path / "fla"), "--to", "fla"]) == 0
    assert json.loads((tmp_path / "fla" / "config.json").read_text())["model_type"] == "mom"
    assert tool.main([str(tmp_path / "fla"), str(tmp_path / "back"), "--dtype", "float32"]) == 0
    loaded, _ = load_pretrained(tmp_path / "back")
    assert torch.equal(_logits(loaded), _logits(reference))
    assert tool.main([str(tmp_path / "missing.ckpt"), str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


# The torch stand-ins of tools/verify_fla_interop.py (its CPU mode for fla's layer logic) -------------------------
@pytest.mark.parametrize("state_v_first", [False, True], ids=["state-kv", "state-vk"])
def test_verify_tool_delta_rule_reference_matches_the_oracle(state_v_first):
    from mom_lit.ops.scan.recurrent import recurrent_scan

    tool = load_tool("verify_fla_interop")
    g = torch.Generator().manual_seed(SEED)
    T, H, K, V = 23, 2, 4, 3
    cu = torch.tensor([0, 5, 5, 6, 23])  # an empty and a one-token segment

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q, k, v = rand(1, T, H, K), rand(1, T, H, K), rand(1, T, H, V)
    a, b = rand(1, T, H), rand(1, T, H)  # raw gate and beta inputs: fla's GatedDeltaNet passes them so
    a_log, dt_bias = rand(H), rand(H)
    h0 = rand(4, H, K, V)  # (N, H, K, V)
    o, final = tool.reference_gated_delta_rule(
        q, k, v, a, b, initial_state=h0.transpose(-1, -2) if state_v_first else h0, output_final_state=True,
        use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True, state_v_first=state_v_first, cu_seqlens=cu,
        use_gate_in_kernel=True, A_log=a_log, dt_bias=dt_bias)

    def l2(x):  # fla's in-kernel normalisation
        return x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)

    gate = -a_log.exp() * torch.nn.functional.softplus(a + dt_bias)
    o_ref, final_ref = recurrent_scan(l2(q), l2(k), v, g=gate, beta=b.sigmoid(), initial_state=h0, cu_seqlens=cu)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(final.transpose(-1, -2) if state_v_first else final, final_ref)


def test_verify_tool_conv_reference_matches_conv1d_and_its_step():
    tool = load_tool("verify_fla_interop")
    g = torch.Generator().manual_seed(SEED)
    D, W, cu = 5, 4, [0, 2, 9, 16]
    x = torch.randn(1, cu[-1], D, generator=g, dtype=torch.float64)
    weight = torch.randn(D, W, generator=g, dtype=torch.float64)
    y, final = tool.reference_causal_conv1d(x, weight, activation="silu", output_final_state=True,
                                            cu_seqlens=torch.tensor(cu))
    for i, (start, end) in enumerate(zip(cu[:-1], cu[1:])):
        seg = torch.nn.functional.pad(x[0, start:end].t(), (W - 1, 0))  # (D, W-1 + L), zeros before the segment
        expected = torch.nn.functional.silu(torch.nn.functional.conv1d(seg[None], weight[:, None], groups=D))[0].t()
        torch.testing.assert_close(y[0, start:end], expected)
        torch.testing.assert_close(final[i], seg[:, -W:])
    # Steps on the cache continue each sequence as one longer convolution would.
    nxt = torch.randn(3, D, generator=g, dtype=torch.float64)
    step, cache = tool.reference_causal_conv1d_update(nxt[None], final.clone(), weight=weight, activation="silu")
    for i, (start, end) in enumerate(zip(cu[:-1], cu[1:])):
        longer = torch.cat([x[0, start:end], nxt[i:i + 1]])[None]
        y_long, final_long = tool.reference_causal_conv1d(longer, weight, activation="silu", output_final_state=True)
        torch.testing.assert_close(step[0, i], y_long[0, -1])
        torch.testing.assert_close(cache[i], final_long[0])
