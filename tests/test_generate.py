"""``python -m mom_lit.generate``: streaming, reproducibility, batching, tokenizer choice and errors."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch

from mom_lit import MoMConfig, MoMForCausalLM
from mom_lit.cuda_graphs import capture_cuda_graph
from mom_lit.data.tokenizers import ByteTokenizer, load_tokenizer
from mom_lit.generate import TextStream, main, sample_tokens
from mom_lit.interop import save_fla, save_pretrained

SEED = 42
PROMPTS = ["To be, or not", "héllo ✓", "a"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(vocab_size: int = ByteTokenizer.vocab_size) -> MoMForCausalLM:
    torch.manual_seed(SEED)
    config = MoMConfig(vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=2, head_dim=8,
                       num_memories=3, topk=2, shared_memory=True, chunk_size=8, backend="eager")
    return MoMForCausalLM(config).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_pretrained(_model(), tmp_path_factory.mktemp("model") / "tiny", tokenizer="byte")


def run(*args: str) -> tuple[int, str, str, list[tuple[int, str]]]:
    out, err, pieces = io.StringIO(), io.StringIO(), []
    code = main(list(args), out=out, err=err, on_piece=lambda row, piece: pieces.append((row, piece)))
    return code, out.getvalue(), err.getvalue(), pieces


def test_streams_pieces_that_add_up_to_the_output(checkpoint):
    code, out, err, pieces = run("--checkpoint", str(checkpoint), "--prompt", PROMPTS[0], "--max_new_tokens", "24",
                                 "--seed", "1", "--ignore_eos")
    assert code == 0, err
    assert len(pieces) > 1  # text arrived piece by piece, not at the end
    assert out == PROMPTS[0] + "".join(p for _, p in pieces) + "\n"
    assert re.search(r"decode: 24 tokens in [0-9.]+ s \([0-9.]+ tokens/s\)", err), err
    assert "prefill: 13 tokens" in err and "tokenizer byte" in err


def test_seed_makes_sampling_reproducible(checkpoint):
    args = ("--checkpoint", str(checkpoint), "--prompt", PROMPTS[0], "--max_new_tokens", "24", "--ignore_eos",
            "--temperature", "1.0", "--top_k", "50", "--top_p", "0.95")
    first, second, other = (run(*args, "--seed", seed)[1] for seed in ("7", "7", "8"))
    assert first == second
    assert first != other


def test_sample_tokens_shapes_and_greedy_equals_model_generate():
    model = _model()
    prompts = [ByteTokenizer().encode(p) for p in PROMPTS]
    steps = list(sample_tokens(model, prompts, max_new_tokens=9, temperature=0))
    assert len(steps) == 9 and all(len(step) == len(prompts) for step in steps)
    for row, prompt in enumerate(prompts):  # packed prefill of all prompts == each prompt alone
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=9, temperature=0)[0, len(prompt):]
        assert [step[row] for step in steps] == expected.tolist()


def test_batch_equals_one_at_a_time_when_greedy(checkpoint):
    args = ["--checkpoint", str(checkpoint), "--max_new_tokens", "16", "--temperature", "0", "--ignore_eos"]
    for prompt in PROMPTS:
        args += ["--prompt", prompt]
    completions = {}
    for mode in ((), ("--batch",)):
        code, out, err, pieces = run(*args, *mode)
        assert code == 0, err
        text = {row: "".join(p for r, p in pieces if r == row) for row in range(len(PROMPTS))}
        completions[mode] = text
        lines = [PROMPTS[row] + text[row] + "\n" for row in range(len(PROMPTS))]
        assert out == ("".join(lines) if mode else "\n".join(lines))  # one at a time: a blank line between
    assert completions[()] == completions[("--batch",)]
    assert all(len(text) > 0 for text in completions[()].values())


def test_generation_stops_at_end_of_document(checkpoint):
    model = _model()
    with torch.no_grad():
        model.lm_head.weight[ByteTokenizer.eos_id] += 100.0  # EOS is the most likely token everywhere
    steps = list(sample_tokens(model, [[65], [66, 67]], max_new_tokens=5, temperature=0,
                               eos_id=ByteTokenizer.eos_id))
    assert steps == [[ByteTokenizer.eos_id, ByteTokenizer.eos_id]]


@pytest.mark.parametrize("text", ["héllo wörld ✓ 𝄞", "日本語", "plain"])
def test_text_stream_never_splits_a_character(text):
    stream = TextStream(ByteTokenizer(), context=ByteTokenizer().encode("ctx"))
    pieces = [stream.put(b) for b in text.encode("utf-8")] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_text_stream_shows_invalid_bytes_as_replacement():
    stream = TextStream(ByteTokenizer())
    pieces = [stream.put(b) for b in (0xE2, 0x9C, ord("a"), 0xF0)]
    assert "".join(pieces) == "\ufffda"  # an interrupted character is shown once the next one is complete
    assert stream.flush() == "\ufffd"  # and a dangling lead byte at the end


def test_tokenizer_comes_from_the_checkpoint(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "<|endoftext|>", "to", "be", "or", "not"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    model = _model(vocab_size=load_tokenizer(str(tmp_path / "tokenizer.json")).vocab_size)
    fla_dir = save_fla(model, tmp_path / "fla")
    (fla_dir / "tokenizer.json").write_bytes((tmp_path / "tokenizer.json").read_bytes())
    code, out, err, _ = run("--checkpoint", str(fla_dir), "--prompt", "to be", "--max_new_tokens", "5",
                            "--seed", "0", "--ignore_eos")
    assert code == 0, err
    assert "mom checkpoint, tokenizer fla" in err  # the tokenizer.json beside fla's weights
    assert set(out.split()) <= set(words)  # WordLevel decoding: only its own words come out
    # An explicit --tokenizer wins; byte ids beyond the model's 64-row vocabulary are refused clearly.
    code, _, err, _ = run("--checkpoint", str(fla_dir), "--prompt", "to be", "--tokenizer", "byte")
    assert code == 2 and "vocab_size" in err


def test_missing_checkpoint_and_bad_arguments_are_reported(tmp_path, checkpoint):
    code, out, err, _ = run("--checkpoint", str(tmp_path / "missing.ckpt"), "--prompt", "x")
    assert code == 2 and "does not exist" in err and out == ""
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, _, err, _ = run("--checkpoint", str(tmp_path / "not_a_model"))
    assert code == 2 and "model_type 'llama'" in err
    code, _, err, _ = run("--checkpoint", str(checkpoint), "--top_p", "1.5")
    assert code == 2 and "--top_p" in err


def test_cuda_graph_needs_a_cuda_model(checkpoint):
    with pytest.raises(ValueError, match="CUDA device"):
        list(sample_tokens(_model(), [[65, 66]], max_new_tokens=3, cuda_graph=True))
    code, out, err, _ = run("--checkpoint", str(checkpoint), "--device", "cpu", "--cuda_graph")
    assert code == 2 and "--cuda_graph needs a CUDA device" in err and out == ""


def test_graph_capture_rejects_a_cpu_device_and_no_warmup():
    calls = []
    with pytest.raises(ValueError, match="needs a CUDA device, got cpu"):
        capture_cuda_graph(lambda: calls.append(1), device="cpu")
    with pytest.raises(ValueError, match="warmup must be at least 1"):
        capture_cuda_graph(lambda: calls.append(1), device="cuda", warmup=0)
    assert calls == []  # rejected before running anything
