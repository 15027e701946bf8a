"""Hugging Face conventions: MoMForCausalLM.from_pretrained / save_pretrained / push_to_hub, the flat config.json,
the model card and tokenizer beside the weights, the earlier nested layout, and Hub repositories in the local cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from mom_lit import MoMForCausalLM
from mom_lit.data.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer
from mom_lit.interop import load_checkpoint
from closeness import assert_close
from test_data import _hub_cache_entry, _word_level_tokenizer
from test_interop import _config, _logits, _random_model

DATA = Path(__file__).parent / "data"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_save_pretrained_writes_a_flat_config_card_and_tokenizer_and_loads_back(tmp_path, tied):
    model = _random_model(_config(tie_embeddings=tied))
    tokenizer = "byte" if tied else str(_word_level_tokenizer(tmp_path / "tok"))
    out = model.save_pretrained(tmp_path / "model", tokenizer=tokenizer)

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mom_lit" and config["architectures"] == ["MoMForCausalLM"]
    assert {k: config[k] for k in model.config.to_dict()} == model.config.to_dict()
    assert config["dtype"] == "float32"
    assert ("lm_head.weight" in load_file(out / "model.safetensors")) is not tied  # a tied head is stored once
    card = (out / "README.md").read_text()
    assert "library_name: mom_lit" in card and "pipeline_tag: text-generation" in card
    assert f"{model.num_parameters():,}" in card
    if tied:
        assert config["tokenizer"] == "byte"
        assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "ByteTokenizer"
        assert isinstance(load_tokenizer(str(out)), ByteTokenizer)
    else:
        assert config["tokenizer"] == "tokenizer.json"
        assert (out / "tokenizer.json").read_bytes() == (tmp_path / "tok" / "tokenizer.json").read_bytes()
        assert isinstance(load_tokenizer(str(out)), HFTokenizer)

    loaded = MoMForCausalLM.from_pretrained(out)
    assert not loaded.training
    assert loaded.config == model.config
    assert (loaded.lm_head.weight is loaded.embed.weight) is tied
    assert torch.equal(_logits(loaded), _logits(model))
    assert load_checkpoint(out).tokenizer == ("byte" if tied else str(out / "tokenizer.json"))


def test_from_pretrained_dtype_and_an_edited_card_is_kept(tmp_path):
    model = _random_model(_config())
    out = model.save_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert MoMForCausalLM.from_pretrained(out).embed.weight.dtype == torch.bfloat16  # as stored by default
    assert MoMForCausalLM.from_pretrained(out, dtype=torch.float32).embed.weight.dtype == torch.float32
    (out / "README.md").write_text("my own notes\n")
    model.save_pretrained(out)
    assert (out / "README.md").read_text() == "my own notes\n"


def test_earlier_nested_export_still_loads():
    # tests/data/legacy_export was written by the earlier save_pretrained: {"model_type", "config": {...}, ...}.
    assert isinstance(json.loads((DATA / "legacy_export" / "config.json").read_text())["config"], dict)
    golden = load_file(DATA / "legacy_export_logits.safetensors")
    model = MoMForCausalLM.from_pretrained(DATA / "legacy_export")
    with torch.no_grad():  # the same weights: equal to fp32 rounding (a wrongly loaded tensor is off by O(1))
        assert_close(model(golden["input_ids"]).logits, golden["logits"], 1e-5, name="logits")
    loaded = load_checkpoint(DATA / "legacy_export")
    assert loaded.source == "pretrained" and loaded.tokenizer == "byte" and loaded.config == model.config


@pytest.mark.parametrize("edit, match", [
    pytest.param({"num_layer": 2}, "unknown MoMConfig fields: \\['num_layer'\\]", id="unknown-field"),
    pytest.param({"topk": 9}, "topk", id="invalid-value"),
    pytest.param({"model_type": "mom"}, "model_type is 'mom'", id="other-model-type"),
])
def test_bad_config_json_is_named(tmp_path, edit, match):
    out = _random_model(_config()).save_pretrained(tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ValueError, match=match):
        MoMForCausalLM.from_pretrained(out)


def test_from_pretrained_refuses_a_config_argument(tmp_path):
    out = _random_model(_config()).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="reads the model's config from config.json"):
        MoMForCausalLM.from_pretrained(out, config=_config())


def test_from_pretrained_by_repo_id_from_the_local_cache_offline(tmp_path):
    model = _random_model(_config())
    cache = tmp_path / "hub"
    model.save_pretrained(_hub_cache_entry(cache, "acme/mom-tiny"), tokenizer="byte")
    loaded = MoMForCausalLM.from_pretrained("acme/mom-tiny", cache_dir=cache, local_files_only=True)
    assert torch.equal(_logits(loaded), _logits(model))
    assert isinstance(load_tokenizer("acme/mom-tiny", cache_dir=cache), ByteTokenizer)
    with pytest.raises(FileNotFoundError):  # not cached, and no network allowed
        MoMForCausalLM.from_pretrained("acme/absent", cache_dir=cache, local_files_only=True)


class _RecordingApi:
    """Stands in for huggingface_hub.HfApi: records the calls and what the uploaded folder held."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: dict[str, bytes] = {}

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return SimpleNamespace(repo_id="someone/" + kwargs["repo_id"].split("/")[-1])

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        folder = Path(kwargs["folder_path"])
        self.uploaded = {p.name: p.read_bytes() for p in folder.iterdir()}
        return "https://huggingface.co/someone/mom-tiny/commit/0"


def test_push_to_hub_uploads_what_save_pretrained_writes(tmp_path):
    model = _random_model(_config())
    api = _RecordingApi()
    url = model.push_to_hub("mom-tiny", tokenizer="byte", private=True, api=api, commit_message="first")
    assert url.endswith("/commit/0")
    (create, create_args), (upload, upload_args) = api.calls
    assert (create, upload) == ("create_repo", "upload_folder")
    assert create_args == {"repo_id": "mom-tiny", "private": True, "exist_ok": True}
    assert upload_args["repo_id"] == "someone/mom-tiny" and upload_args["repo_type"] == "model"
    assert upload_args["commit_message"] == "first"
    assert not Path(upload_args["folder_path"]).exists()  # a temporary folder, removed after the upload
    local = model.save_pretrained(tmp_path / "mom-tiny", tokenizer="byte")
    card = api.uploaded.pop("README.md").decode()
    assert 'from_pretrained("someone/mom-tiny")' in card  # the card names the repository
    assert api.uploaded == {p.name: p.read_bytes() for p in local.iterdir() if p.name != "README.md"}


def test_save_pretrained_can_push(tmp_path):
    api = _RecordingApi()
    _random_model(_config()).save_pretrained(tmp_path / "mom-tiny", push_to_hub=True, api=api)
    assert api.calls[0][1]["repo_id"] == "mom-tiny"  # the folder's name by default
    assert {"config.json", "model.safetensors", "README.md"} <= set(api.uploaded)


def test_tokenizer_download_advice_is_a_command_of_the_hf_cli():
    # The message of a tokenizer missing offline advises `hf download <repo> tokenizer.json`.
    proc = subprocess.run([sys.executable, "-m", "huggingface_hub.cli.hf", "download", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "REPO_ID" in proc.stdout, proc.stderr


def test_exported_files_get_the_umask_permissions(tmp_path):
    out = _random_model(_config()).save_pretrained(tmp_path / "m", tokenizer="byte")
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert len(set(modes.values())) == 1, modes  # the weights as readable as config.json and the card


def test_save_pretrained_refuses_push_arguments_without_push(tmp_path):
    with pytest.raises(TypeError, match="private"):
        _random_model(_config()).save_pretrained(tmp_path / "m", private=True)
