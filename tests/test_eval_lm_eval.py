"""The lm-evaluation-harness model ``mom_lit``: offline tasks from a JSONL file, end to end through lm_eval.

The adapter's answers are checked against direct computations with the model: log-likelihoods and greedy
flags of multiple-choice continuations, whole-document log-likelihoods, greedy generations cut at stop strings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from mom_lit import MoMConfig, MoMForCausalLM  # noqa: E402
from mom_lit.data.tokenizers import ByteTokenizer  # noqa: E402
from mom_lit.eval.lm_eval_adapter import MoMEvalLM  # noqa: E402
from mom_lit.interop import save_pretrained  # noqa: E402

SEED = 42
DATA = Path(__file__).parent / "data" / "lm_eval_tiny.jsonl"
EOS = ByteTokenizer.eos_id

TASKS = {
    "tiny_mc": {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]},
    "tiny_ppl": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                 "metric_list": [{"metric": "byte_perplexity"}]},
    "tiny_gen": {"output_type": "generate_until", "doc_to_text": "{{question}}",
                 "doc_to_target": "{{choices[answer]}}", "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6},
                 "metric_list": [{"metric": "exact_match"}]},
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, one_thread):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _model() -> MoMForCausalLM:
    torch.manual_seed(SEED)
    config = MoMConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=32, num_layers=2, num_heads=2, head_dim=8,
                       num_memories=3, topk=2, shared_memory=True, chunk_size=8, backend="eager")
    return MoMForCausalLM(config).eval()


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """lm_eval task YAMLs over the JSONL file (JSON is a subset of YAML)."""
    folder = tmp_path_factory.mktemp("tasks")
    for name, spec in TASKS.items():
        task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(DATA)}},
                "test_split": "test", **spec}
        (folder / f"{name}.yaml").write_text(json.dumps(task, indent=1))
    return folder


@pytest.fixture(scope="module")
def samples(task_dir) -> dict[str, list[dict]]:
    # A budget of 24 tokens packs a few requests per pass and runs the longer documents in chunks on the cache.
    lm = MoMEvalLM(model=_model(), tokenizer="byte", max_batch_tokens=24, batch_size=3)
    with pytest.MonkeyPatch.context() as patch:
        # The environment report lists every installed package through pip: seconds, and nothing is checked on it.
        patch.setattr("lm_eval.evaluator.add_env_info", lambda results: None)
        results = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), task_manager=_tasks(task_dir),
                                          log_samples=True, bootstrap_iters=0)
    assert set(results["results"]) == set(TASKS)
    return results["samples"]


def _tasks(folder: Path) -> TaskManager:
    # Our tasks only: indexing lm_eval's own thousands of task files takes seconds.
    return TaskManager(include_path=str(folder), include_defaults=False)


def _direct(model: MoMForCausalLM, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Sum of log p(continuation | context) and whether it is the greedy continuation, from one plain forward."""
    ids = torch.tensor(context + continuation)[None]
    with torch.no_grad():
        logits = model(ids).logits[0, len(context) - 1:-1].double()  # (len(continuation), V)
    target = torch.tensor(continuation)
    logprob = torch.log_softmax(logits, -1).gather(-1, target[:, None]).sum()
    return float(logprob), bool((logits.argmax(-1) == target).all())


def test_multiple_choice_loglikelihoods_match_the_model(samples):
    model = _model()
    docs = samples["tiny_mc"]
    assert len(docs) == 5
    for sample in docs:
        doc = sample["doc"]
        expected = []
        for choice, (logprob, greedy) in zip(doc["choices"], sample["filtered_resps"]):
            # lm_eval joins context and choice with a space; the continuation carries it.
            direct, direct_greedy = _direct(model, list(doc["question"].encode()), list((" " + choice).encode()))
            assert float(logprob) == pytest.approx(direct, rel=1e-5, abs=1e-4)
            assert str(greedy) == str(direct_greedy)
            expected.append(direct)
        assert sample["acc"] == float(max(range(len(expected)), key=expected.__getitem__) == doc["answer"])
    assert len(docs[0]["filtered_resps"]) == 3


def test_rolling_loglikelihood_scores_the_document_after_the_prefix(samples):
    model = _model()
    for sample in samples["tiny_ppl"]:
        text = sample["doc"]["text"]
        direct, _ = _direct(model, [EOS], list(text.encode()))
        assert float(sample["filtered_resps"][0]) == pytest.approx(direct, rel=1e-5, abs=1e-4)


def test_generation_is_the_greedy_continuation(samples):
    model = _model()
    for sample in samples["tiny_gen"]:
        prompt = torch.tensor(list(sample["doc"]["question"].encode()))[None]
        ids = model.generate(prompt, max_new_tokens=6, temperature=0, eos_token_id=EOS)[0, prompt.shape[1]:]
        ids = ids.tolist()
        ids = ids[:ids.index(EOS)] if EOS in ids else ids
        assert sample["filtered_resps"][0] == ByteTokenizer().decode(ids).split("\n")[0]


def test_generation_stops_at_the_first_stop_string():
    model = _model()
    lm = MoMEvalLM(model=model, tokenizer="byte")
    prompts = ["To be, or not", "ab"]
    full = lm.generate_until([Instance("generate_until", {}, (p, {"until": [], "max_gen_toks": 12}), i)
                              for i, p in enumerate(prompts)])
    assert len(full[0]) >= 8 and len(full[1]) >= 4  # this seed's greedy text does not end early
    # Stop strings taken from what greedy decoding produces: the output is the text before the earliest one.
    stops = [[full[0][4:6], full[0][7]], [full[1][2:4]]]
    cut = lm.generate_until([Instance("generate_until", {}, (p, {"until": s, "max_gen_toks": 12}), i)
                             for i, (p, s) in enumerate(zip(prompts, stops))])
    for text, stop, out in zip(full, stops, cut):
        assert out == text[:min(text.index(s) for s in stop)]


def test_command_line_loads_a_checkpoint_and_writes_results(task_dir, tmp_path, monkeypatch):
    from mom_lit.eval.__main__ import main

    checkpoint = save_pretrained(_model(), tmp_path / "model", tokenizer="byte")
    monkeypatch.chdir(tmp_path)
    # The command line indexes lm_eval's own tasks too; only ours are needed here (indexing takes seconds).
    init = TaskManager.__init__
    monkeypatch.setattr(TaskManager, "__init__",
                        lambda self, *a, **k: init(self, *a, **{**k, "include_defaults": False}))
    monkeypatch.setattr("lm_eval.evaluator.add_env_info", lambda results: None)
    main(["--model", "mom_lit", "--model_args", f"checkpoint={checkpoint},max_batch_tokens=64",
          "--tasks", "tiny_mc", "--include_path", str(task_dir), "--device", "cpu", "--output_path", "out"])
    (result,) = Path("out").rglob("results_*.json")
    report = json.loads(result.read_text())
    assert report["results"]["tiny_mc"]["acc,none"] == pytest.approx(
        sum(_argmax_is_answer(_model(), json.loads(line)) for line in DATA.read_text().splitlines()) / 5)


def _argmax_is_answer(model: MoMForCausalLM, doc: dict) -> bool:
    scores = [_direct(model, list(doc["question"].encode()), list((" " + c).encode()))[0] for c in doc["choices"]]
    return max(range(len(scores)), key=scores.__getitem__) == doc["answer"]


def test_rejects_a_tokenizer_larger_than_the_vocabulary():
    config = MoMConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, head_dim=8, backend="eager")
    with pytest.raises(ValueError, match="needs 320 embedding rows"):
        MoMEvalLM(model=MoMForCausalLM(config), tokenizer="byte")
