"""Multi-query associative recall: generation, seeds, the datamodule and the accuracy helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mom_lit.data.mqar import IGNORE_INDEX, MQARDataModule, mqar_accuracy, mqar_accuracy_by_slice, mqar_batch

SEED = 42
SHAPES = [
    pytest.param(64, 16, 4, id="exact-fit-T=4K"),
    pytest.param(101, 33, 3, id="odd-V-odd-T"),
    pytest.param(8192, 256, 64, id="zoology-size"),
    pytest.param(20, 9, 1, id="single-pair"),
]


@pytest.mark.parametrize("vocab,seq_len,kv", SHAPES)
def test_examples_are_well_formed(vocab: int, seq_len: int, kv: int) -> None:
    inputs, labels = mqar_batch(200, vocab, seq_len, kv, seed=SEED)
    assert inputs.shape == labels.shape == (200, seq_len)
    assert inputs.dtype == labels.dtype == torch.int64
    assert int(inputs.min()) >= 0 and int(inputs.max()) < vocab
    half = vocab // 2
    for x, y in zip(inputs.tolist(), labels.tolist()):
        keys, values = x[0 : 2 * kv : 2], x[1 : 2 * kv : 2]
        assert len(set(keys)) == kv and all(1 <= k < half for k in keys)
        assert len(set(values)) == kv and all(half <= v < vocab for v in values)
        answers = [t for t, label in enumerate(y) if label != IGNORE_INDEX]
        assert len(answers) == kv, "one answer per key"
        assert all(t >= 2 * kv and (t - 2 * kv) % 2 == 0 for t in answers), "queries sit on even slots after the pairs"
        lookup = dict(zip(keys, values))
        assert sorted(x[t] for t in answers) == sorted(keys), "every key is queried exactly once"
        assert all(y[t] == lookup[x[t]] for t in answers), "the label of a query is its key's value"


def test_fillers_without_random_non_queries_are_zero() -> None:
    inputs, labels = mqar_batch(50, 64, 32, 4, seed=SEED, random_non_queries=False)
    queries = labels != IGNORE_INDEX
    region = inputs[:, 8:]
    assert bool((region[~queries[:, 8:]] == 0).all())


def test_generation_is_deterministic_in_the_seed() -> None:
    a = mqar_batch(64, 512, 64, 8, seed=SEED)
    b = mqar_batch(64, 512, 64, 8, seed=SEED)
    c = mqar_batch(64, 512, 64, 8, seed=SEED + 1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_power_law_places_queries_near_the_pairs() -> None:
    def mean_query_offset(power_a: float) -> float:
        inputs, labels = mqar_batch(2000, 512, 128, 4, seed=SEED, power_a=power_a)
        positions = (labels != IGNORE_INDEX).nonzero()[:, 1].double()
        return float((positions - 8).mean())

    skewed, uniform = mean_query_offset(0.01), mean_query_offset(1.0)
    # Uniform over 60 slots of width 2: mean offset close to 59; the power law pulls it far below.
    assert abs(uniform - 59.0) < 3.0
    assert skewed < 0.6 * uniform


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"seq_len": 15, "num_kv_pairs": 4}, "seq_len=15 is too short"),
        ({"vocab_size": 8, "num_kv_pairs": 4}, "vocab_size=8"),
        ({"num_kv_pairs": 0}, "num_kv_pairs"),
        ({"power_a": 0.0}, "power_a"),
    ],
)
def test_invalid_arguments_are_named(kwargs: dict, match: str) -> None:
    args = {"num_examples": 4, "vocab_size": 64, "seq_len": 32, "num_kv_pairs": 4, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=match):
        mqar_batch(**args)


def _datamodule(**overrides: object) -> MQARDataModule:
    args: dict = dict(
        vocab_size=256,
        seq_len=64,
        train_num_kv_pairs=(2, 4, 8),
        test_num_kv_pairs=(4, 16),
        num_train_examples=96,
        num_test_examples=40,
        batch_size=16,
        seed=SEED,
    )
    return MQARDataModule(**(args | overrides))


def test_datamodule_batches_and_slices() -> None:
    dm = _datamodule()
    assert dm.vocab_size == 256 and dm.eos_id is None
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert len(train) == 3 * 96 // 16
    slices = torch.cat([b["slice"] for b in train])
    assert sorted(torch.unique(slices).tolist()) == [2, 4, 8]
    for batch in train:
        assert set(batch) == {"input_ids", "labels", "slice"}
        assert batch["input_ids"].shape == batch["labels"].shape == (16, 64)
        assert batch["input_ids"].dtype == batch["labels"].dtype == batch["slice"].dtype == torch.int64
        answers = (batch["labels"] != IGNORE_INDEX).sum(dim=1)
        assert torch.equal(answers, batch["slice"]), "the slice tag is the number of queries"
    val = list(dm.val_dataloader())
    assert sum(b["input_ids"].shape[0] for b in val) == 2 * 40
    assert torch.equal(torch.cat([b["slice"] for b in val]).unique(), torch.tensor([4, 16]))


def test_datamodule_is_reproducible_and_train_test_disjoint() -> None:
    first, second = _datamodule(), _datamodule()
    first.setup("fit")
    second.setup("fit")
    for split in ("train", "test"):
        assert torch.equal(first._sets[split].inputs, second._sets[split].inputs)
    assert torch.equal(
        torch.cat([b["input_ids"] for b in first.train_dataloader()]),
        torch.cat([b["input_ids"] for b in second.train_dataloader()]),
    ), "the shuffled order is seeded too"
    train, test = first._sets["train"], first._sets["test"]
    # The K=4 slice exists in both splits; its examples come from different streams.
    train4 = train.inputs[train.slices == 4].numpy()
    test4 = test.inputs[test.slices == 4].numpy()
    train_rows = {row.tobytes() for row in train4}
    assert not any(row.tobytes() in train_rows for row in test4), "a test example also occurs in train"
    assert not np.array_equal(train4[: len(test4)], test4)


def test_datamodule_rejects_impossible_slices() -> None:
    with pytest.raises(ValueError, match="seq_len=64 is too short for num_kv_pairs=32"):
        _datamodule(test_num_kv_pairs=(32,))
    with pytest.raises(ValueError, match="batch_size"):
        _datamodule(batch_size=1000)


def test_accuracy_helpers() -> None:
    vocab = 64
    inputs, labels = mqar_batch(6, vocab, 32, 4, seed=SEED)
    perfect = torch.nn.functional.one_hot(labels.clamp(min=0), vocab).float()  # (B, T, V)
    assert torch.equal(mqar_accuracy(perfect, labels), torch.ones(6))
    flat = perfect.reshape(1, -1, vocab)  # the packed model's (1, B*T, V)
    assert torch.equal(mqar_accuracy(flat, labels), torch.ones(6))
    wrong = torch.nn.functional.one_hot((labels.clamp(min=0) + 1) % vocab, vocab).float()
    assert torch.equal(mqar_accuracy(wrong, labels), torch.zeros(6))
    # Half of the answers of example 0 right: its accuracy is 0.5.
    mixed = wrong.clone()
    answer_pos = (labels[0] != IGNORE_INDEX).nonzero()[:, 0]
    mixed[0, answer_pos[:2]] = perfect[0, answer_pos[:2]]
    accuracy = mqar_accuracy(mixed, labels)
    assert accuracy[0].item() == 0.5 and bool((accuracy[1:] == 0).all())
    by_slice = mqar_accuracy_by_slice(mixed, labels, torch.tensor([4, 4, 8, 8, 8, 8]))
    assert set(by_slice) == {4, 8}
    assert by_slice[4].item() == pytest.approx(0.25) and by_slice[8].item() == 0.0
    with pytest.raises(ValueError, match="do not match"):
        mqar_accuracy(perfect[:, :5], labels)


def test_validation_split_is_its_own_stream() -> None:
    """With num_val_examples, validation draws from a stream of its own: disjoint from train and test,
    reproducible, over the test slices; without it, validation is the test set."""
    dm = _datamodule(num_val_examples=24)
    dm.setup("fit")
    val = dm._sets["val"]
    assert val.inputs.shape == (2 * 24, 64)
    assert torch.equal(val.slices.unique(), torch.tensor([4, 16], dtype=val.slices.dtype))
    rows = {split: {row.tobytes() for row in dm._sets[split].inputs.numpy()} for split in ("train", "test")}
    assert not any(row.tobytes() in rows["train"] | rows["test"] for row in val.inputs.numpy())
    loaded = torch.cat([b["input_ids"] for b in dm.val_dataloader()])
    assert torch.equal(loaded, val.inputs.long())
    again = _datamodule(num_val_examples=24)
    assert torch.equal(again.build("val").inputs, val.inputs)

    plain = _datamodule()
    plain.setup("fit")
    assert "val" not in plain._sets
    assert torch.equal(torch.cat([b["input_ids"] for b in plain.val_dataloader()]), plain._sets["test"].inputs.long())
    with pytest.raises(ValueError, match="set num_val_examples > 0"):
        plain.build("val")
    with pytest.raises(ValueError, match="num_val_examples"):
        _datamodule(num_val_examples=-1)
