"""Bad arguments to the Python API (the model's loss, generation) and to the generate command: each is refused
with a ``ValueError`` naming the argument and what it accepts."""

from __future__ import annotations

import io
import re

import pytest
import torch

from mom_lit import MoMConfig, MoMForCausalLM
from mom_lit.generate import main as generate_main
from mom_lit.generate import sample_tokens
from mom_lit.model import sample_next

VOCAB = 61
NAN, INF = float("nan"), float("inf")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> MoMForCausalLM:
    torch.manual_seed(0)
    config = MoMConfig(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2, head_dim=8, num_memories=3,
                       topk=2, chunk_size=8, backend="eager")
    return MoMForCausalLM(config).eval()


def _ids(seq_len: int = 6) -> torch.Tensor:
    return torch.arange(2 * seq_len).reshape(2, seq_len) % VOCAB  # (2, T)


# Labels and targets of the loss ------------------------------------------------------------------------------------
@pytest.mark.parametrize("argument", ["labels", "targets"])
@pytest.mark.parametrize("bad, shown", [
    pytest.param(VOCAB, f"min {VOCAB}, max {VOCAB}", id="=vocab"),
    pytest.param(VOCAB + 40, f"min {VOCAB + 40}, max {VOCAB + 40}", id=">vocab"),
    pytest.param(-1, "min -1, max -1", id="negative"),
    pytest.param(-101, "min -101, max -101", id="below-ignore-index"),
])
def test_labels_outside_the_vocabulary_are_named(model, argument, bad, shown):
    values = _ids().clone()
    values[1, 3] = bad
    message = (f"{argument} must lie in [0, vocab_size={VOCAB}) or be -100 (ignored), got 1 value(s) outside it "
               f"({shown})")
    with pytest.raises(ValueError, match=re.escape(message)):
        model(_ids(), **{argument: values})


def test_ignored_and_boundary_labels_are_accepted(model):
    labels = _ids().clone()
    labels[0, :3] = -100
    labels[1, 0], labels[1, 1] = 0, VOCAB - 1
    with torch.no_grad():
        assert torch.isfinite(model(_ids(), labels=labels).loss)
        assert torch.isfinite(model(_ids(), targets=labels.int()).loss)


def test_float_labels_are_refused(model):
    with pytest.raises(ValueError, match=re.escape("labels must be an integer tensor, got torch.float32")):
        model(_ids(), labels=_ids().float())


# Generation: the model's method and sample_tokens -------------------------------------------------------------------
BAD_SAMPLING = [
    pytest.param(dict(max_new_tokens=2.5), "max_new_tokens must be an integer >= 0, got 2.5 (float)", id="fractional"),
    pytest.param(dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0, got -1 (int)", id="negative-steps"),
    pytest.param(dict(max_new_tokens=True), "max_new_tokens must be an integer >= 0, got True (bool)", id="bool-steps"),
    pytest.param(dict(temperature=NAN), "temperature must be a finite number >= 0 (0 is greedy), got nan",
                 id="temperature-nan"),
    pytest.param(dict(temperature=-0.5), "temperature must be a finite number >= 0 (0 is greedy), got -0.5",
                 id="temperature<0"),
    pytest.param(dict(temperature=INF), "temperature must be a finite number >= 0 (0 is greedy), got inf",
                 id="temperature-inf"),
    pytest.param(dict(top_k=0), "top_k must be an integer >= 1 (or None: no top-k cut), got 0 (int)", id="top_k0"),
    pytest.param(dict(top_k=-3), "top_k must be an integer >= 1 (or None: no top-k cut), got -3", id="top_k<0"),
    pytest.param(dict(top_k=2.0), "top_k must be an integer >= 1 (or None: no top-k cut), got 2.0 (float)",
                 id="top_k-float"),
    pytest.param(dict(top_p=NAN), "top_p must be a number in (0, 1] (or None: no nucleus cut), got nan",
                 id="top_p-nan"),
    pytest.param(dict(top_p=0.0), "top_p must be a number in (0, 1] (or None: no nucleus cut), got 0.0",
                 id="top_p0"),
]


@pytest.mark.parametrize("kwargs, message", BAD_SAMPLING)
def test_model_generate_names_the_bad_argument(model, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        model.generate(_ids(), **{"max_new_tokens": 3, **kwargs})


@pytest.mark.parametrize("kwargs, message", BAD_SAMPLING)
def test_sample_tokens_names_the_bad_argument(model, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        next(sample_tokens(model, [[1, 2, 3]], **{"max_new_tokens": 3, **kwargs}))


@pytest.mark.parametrize("kwargs, message", [p for p in BAD_SAMPLING if "max_new_tokens" not in p.values[0]])
def test_sample_next_names_the_bad_argument(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        sample_next(torch.zeros(2, VOCAB), **kwargs)


def test_empty_prompts_are_refused(model):
    with pytest.raises(ValueError, match=re.escape("input_ids must be a (B, T) prompt of at least one token, "
                                                   "got shape (2, 0)")):
        model.generate(torch.zeros(2, 0, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match=re.escape("prompts[1] is empty")):
        next(sample_tokens(model, [[1, 2], []], max_new_tokens=2))
    with pytest.raises(ValueError, match=re.escape("prompts must hold at least one prompt, got none")):
        next(sample_tokens(model, [], max_new_tokens=2))


def test_valid_sampling_edge_values_are_accepted(model):
    out = model.generate(_ids(), max_new_tokens=0)
    assert torch.equal(out, _ids())
    out = model.generate(_ids(), max_new_tokens=2, temperature=0, top_k=1, top_p=1.0)
    assert out.shape == (2, 8)
    steps = list(sample_tokens(model, [[1]], max_new_tokens=2, temperature=1, top_k=VOCAB + 5, top_p=0.5))
    assert len(steps) == 2


# The generate command ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    pytest.param(["--temperature", "nan"], "--temperature must be a finite number >= 0 (0 is greedy), got nan",
                 id="temperature-nan"),
    pytest.param(["--temperature", "-1"], "--temperature must be a finite number >= 0", id="temperature<0"),
    pytest.param(["--top_k", "0"], "--top_k must be an integer >= 1", id="top_k0"),
    pytest.param(["--top_k", "-2"], "--top_k must be an integer >= 1", id="top_k<0"),
    pytest.param(["--max_new_tokens", "-1"], "--max_new_tokens must be an integer >= 0", id="negative-steps"),
    pytest.param(["--top_p", "nan"], "--top_p must be a number in (0, 1]", id="top_p-nan"),
])
def test_generate_command_names_the_bad_argument(tmp_path, args, message):
    # The arguments are checked before the checkpoint is read: this one does not exist.
    err = io.StringIO()
    code = generate_main(["--checkpoint", str(tmp_path / "unread.ckpt"), *args], out=io.StringIO(), err=err)
    assert code == 2
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mom-lit generate: error: {message}"), lines


def test_generate_command_refuses_a_fractional_token_count(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        generate_main(["--checkpoint", str(tmp_path / "unread.ckpt"), "--max_new_tokens", "2.5"])
    assert info.value.code == 2
    assert "argument --max_new_tokens: invalid int value: '2.5'" in capsys.readouterr().err
