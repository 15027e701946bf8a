"""mom_lit.eval scoring and loss against context length: packed and chunked paths against one plain forward."""

from __future__ import annotations
import json
import math

import pytest
from tools_import import load_tool
import torch
import torch.nn.functional as F

from mom_lit import MoMConfig, MoMForCausalLM
from mom_lit.eval import bucket_edges, pack_batches, position_loss, score_continuations

SEED = 42


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> MoMForCausalLM:
    torch.manual_seed(SEED)
    config = MoMConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, head_dim=8, num_memories=3, topk=2,
                       shared_memory=True, chunk_size=8, backend="eager")
    return MoMForCausalLM(config).eval()


def _direct_logprobs(model: MoMForCausalLM, seq: list[int]) -> torch.Tensor:
    """(len - 1,) log p(seq[t + 1] | seq[:t + 1]) from one unpacked forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor(seq)[None]).logits[0, :-1].float()  # (len - 1, V)
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(seq[1:])[:, None]).squeeze(-1)


def test_pack_batches_keeps_every_batch_within_the_budget():
    lengths = [5, 1, 9, 3, 30, 7, 2, 2]
    batches = pack_batches(lengths, max_batch_tokens=10, max_batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) == 1 or sum(lengths[i] for i in batch) <= 10
    assert [4] in batches  # longer than the budget: alone
    with pytest.raises(ValueError, match="max_batch_tokens"):
        pack_batches(lengths, 0)


@pytest.mark.parametrize("budget", [4096, 23, 7], ids=["one-pack", "several-packs", "chunked"])
def test_scores_match_a_plain_forward(model, budget):
    g = torch.Generator().manual_seed(SEED)
    lengths = [2, 13, 40, 1, 7, 31]
    seqs = [torch.randint(0, 64, (n,), generator=g).tolist() for n in lengths]
    counts = [1, 5, 39, 0, 3, 12]
    scores = score_continuations(model, seqs, counts, max_batch_tokens=budget, max_batch_size=3)
    for seq, n, score in zip(seqs, counts, scores):
        assert score.logprobs.shape == (n,)
        if n == 0:
            assert score.total == 0.0 and score.all_greedy
            continue
        direct = _direct_logprobs(model, seq)[-n:]
        torch.testing.assert_close(score.logprobs, direct, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            argmax = model(torch.tensor(seq)[None]).logits[0, :-1].argmax(-1)[-n:]
        assert torch.equal(score.greedy, argmax == torch.tensor(seq[-n:]))


def test_scores_reject_a_token_without_context(model):
    with pytest.raises(ValueError, match="cannot score 3 of its 3 tokens"):
        score_continuations(model, [[1, 2, 3]], [3])


def test_bucket_edges_double_up_to_the_length():
    assert bucket_edges(1000, first=64) == [0, 64, 128, 256, 512, 1000]
    assert bucket_edges(512, first=64) == [0, 64, 128, 256, 512]
    assert bucket_edges(10, first=64) == [0, 10]


@pytest.mark.parametrize("chunk,batch", [(1000, 8), (5, 2), (1, 3)], ids=["one-chunk", "chunks", "token-by-token"])
def test_position_loss_matches_a_plain_forward(model, chunk, batch):
    g = torch.Generator().manual_seed(SEED)
    docs = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (30, 12, 41, 1, 26)]
    max_length = 25
    result = position_loss(model, docs, max_length, chunk_size=chunk, batch_size=batch)
    expect_sum = torch.zeros(max_length, dtype=torch.float64)
    expect_count = torch.zeros(max_length, dtype=torch.int64)
    for doc in docs:
        doc = doc[:max_length + 1]
        if len(doc) < 2:
            continue
        nll = -_direct_logprobs(model, doc).double()
        expect_sum[:nll.numel()] += nll
        expect_count[:nll.numel()] += 1
    assert torch.equal(result.count, expect_count)
    torch.testing.assert_close(result.nll_sum, expect_sum, rtol=1e-5, atol=1e-5)
    loss, tokens = result.bucket(0, 12)
    assert tokens == int(expect_count[:12].sum())
    assert math.isclose(loss, float(expect_sum[:12].sum()) / tokens, rel_tol=1e-6)


def test_eval_length_tool_writes_table_json_and_plot(model, tmp_path):
    pytest.importorskip("matplotlib")
    from mom_lit.interop import save_pretrained

    tool = load_tool("eval_length")
    # The tool reads text: a byte-level model over 64 ids sees only the ASCII range below 64.
    text = tmp_path / "doc.txt"
    text.write_text("0123456789:;<=>?" * 20)
    config = MoMConfig(**{**model.config.to_dict(), "vocab_size": 320})
    torch.manual_seed(SEED)
    save_pretrained(MoMForCausalLM(config), tmp_path / "byte_model", tokenizer="byte")
    out = tmp_path / "length"
    rows = tool.main(["--checkpoint", str(tmp_path / "byte_model"), "--text", str(text), "--max-length", "200",
                      "--chunk-size", "64", "--first-bucket", "32", "--train-length", "64", "--out", str(out)])
    assert [r["stop"] for r in rows] == [32, 64, 128, 200]
    assert all(r["tokens"] == r["stop"] - r["start"] for r in rows)  # one document covering every position
    assert (out.with_suffix(".png")).stat().st_size > 0
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["buckets"] == rows and saved["meta"]["tokens_scored"] == 200
    # The plot can be redrawn from the saved numbers alone.
    again = tool.main(["--replot", str(out.with_suffix(".json")), "--out", str(tmp_path / "again")])
    assert again == rows and (tmp_path / "again.png").stat().st_size > 0
