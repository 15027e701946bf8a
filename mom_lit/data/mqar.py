"""Multi-query associative recall (MQAR), the synthetic recall benchmark of the Zoology study.

An example of length T holds ``K`` key-value pairs followed by queries::

    k1 v1 k2 v2 ... kK vK | x x k2 x x x k1 x ...   (x: filler)
                                  ^      ^
    labels:                       v2     v1          (-100 everywhere else)

Keys come from ``[1, V/2)``, values from ``[V/2, V)``, both distinct within an example. Every key is
queried exactly once, at an even offset of the query region; offsets are drawn without replacement with
probability proportional to ``g ** (power_a - 1)`` (g = 1, 2, ... counts pair slots from the start of the
region), a power law that puts most queries close to the pairs, as repeated bigrams are in natural text.
The label of a query position is the value of its key, i.e. the model must emit the value right after
reading the key again. Fillers are random tokens (or 0 with ``random_non_queries=False``).

Train, test and (optional) validation examples come from independent random streams seeded by
``(seed, split, K)`` with split 0 for train, 1 for test and 2 for validation, so no example seed is shared
between them. Batches follow the training contract
(``input_ids``/``labels`` (B, T) int64, no ``cu_seqlens``) plus ``slice`` (B,) int64 = K of each example,
for per-slice accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["IGNORE_INDEX", "MQARDataModule", "mqar_accuracy", "mqar_accuracy_by_slice", "mqar_batch"]

IGNORE_INDEX = -100
_TRAIN, _TEST, _VAL = 0, 1, 2


def _check_task(vocab_size: int, seq_len: int, num_kv_pairs: int) -> None:
    if num_kv_pairs < 1:
        raise ValueError(f"num_kv_pairs must be >= 1, got {num_kv_pairs}")
    if vocab_size // 2 - 1 < num_kv_pairs or vocab_size - vocab_size // 2 < num_kv_pairs:
        raise ValueError(
            f"vocab_size={vocab_size} cannot hold {num_kv_pairs} distinct keys in [1, {vocab_size // 2}) "
            f"and values in [{vocab_size // 2}, {vocab_size})"
        )
    if seq_len < 4 * num_kv_pairs:
        raise ValueError(
            f"seq_len={seq_len} is too short for num_kv_pairs={num_kv_pairs}: the pairs take 2K tokens and the "
            f"K queries need 2K more (seq_len >= {4 * num_kv_pairs})"
        )


def _distinct_integers(rng: np.random.Generator, rows: int, count: int, low: int, high: int) -> np.ndarray:
    """(rows, count) integers from [low, high), distinct within each row, in random order."""
    out = rng.integers(low, high, size=(rows, count))
    while True:
        ordered = np.sort(out, axis=1)
        clash = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)  # (rows,)
        if not clash.any():
            return out
        # Redraw only rows with a repeat; with count << high - low this ends in a few rounds.
        out[clash] = rng.integers(low, high, size=(int(clash.sum()), count))


def mqar_batch(
    num_examples: int,
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    seed: int | Sequence[int],
    power_a: float = 0.01,
    random_non_queries: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate MQAR examples.

    Args:
        num_examples: N.
        vocab_size: V; keys use ``[1, V/2)``, values ``[V/2, V)``.
        seq_len: T, at least ``4 * num_kv_pairs``.
        num_kv_pairs: K, the pairs (and queries) per example.
        seed: seed (or seed sequence) of the numpy generator; equal seeds give equal examples.
        power_a: exponent parameter of the query-offset power law (1 gives uniform offsets).
        random_non_queries: random filler tokens instead of 0.

    Returns:
        ``inputs`` (N, T) int64 and ``labels`` (N, T) int64 (value at each query position, -100 elsewhere).
    """
    _check_task(vocab_size, seq_len, num_kv_pairs)
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    if power_a <= 0:
        raise ValueError(f"power_a must be > 0, got {power_a}")
    rng = np.random.default_rng(seed)
    n, k = num_examples, num_kv_pairs
    keys = _distinct_integers(rng, n, k, 1, vocab_size // 2)  # (N, K)
    values = _distinct_integers(rng, n, k, vocab_size // 2, vocab_size)  # (N, K)

    # Query offsets: K distinct pair slots of the query region, sampled without replacement under the power
    # law via the Gumbel top-k trick (the K largest of log p + Gumbel noise).
    context = 2 * k
    slots = (seq_len - context) // 2
    log_p = (power_a - 1.0) * np.log(np.arange(1, slots + 1, dtype=np.float64))  # (S,)
    scores = log_p + rng.gumbel(size=(n, slots))  # (N, S)
    gaps = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (N, K), valid since _check_task ensures K <= S
    query_pos = context + 2 * gaps  # (N, K): position of the repeated key k_j

    if random_non_queries:
        inputs = rng.integers(0, vocab_size, size=(n, seq_len))
    else:
        inputs = np.zeros((n, seq_len), dtype=np.int64)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    np.put_along_axis(inputs, query_pos, keys, axis=1)
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    np.put_along_axis(labels, query_pos, values, axis=1)
    return torch.from_numpy(inputs), torch.from_numpy(labels)  # both int64


def _as_rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """View logits as (B, T, V) for labels (B, T); accepts (B, T, V), (1, B*T, V) or (B*T, V)."""
    batch, seq_len = labels.shape
    if logits.shape[:-1] == labels.shape:
        return logits
    if logits.shape[:-1].numel() == batch * seq_len:
        return logits.reshape(batch, seq_len, logits.shape[-1])
    raise ValueError(f"logits of shape {tuple(logits.shape)} do not match labels of shape {tuple(labels.shape)}")


def mqar_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example share of query positions whose argmax equals the label.

    Args:
        logits: (B, T, V), or flattened (1, B*T, V) / (B*T, V) as the packed model returns them.
        labels: (B, T) with -100 at positions that are not answers.

    Returns:
        (B,) float32 accuracies; NaN for an example without answer positions.
    """
    rows = _as_rows(logits, labels)
    answer = labels != IGNORE_INDEX  # (B, T)
    correct = (rows.argmax(dim=-1) == labels) & answer  # (B, T)
    return correct.sum(dim=1).float() / answer.sum(dim=1).float()


def mqar_accuracy_by_slice(
    logits: torch.Tensor, labels: torch.Tensor, slices: torch.Tensor
) -> dict[int, torch.Tensor]:
    """Mean accuracy per slice tag (``batch["slice"]``, the K of each example) present in the batch.

    Within a slice every example has the same number of queries, so the mean of per-example accuracies is the
    per-query accuracy.
    """
    accuracy = mqar_accuracy(logits, labels)
    return {int(tag): accuracy[slices == tag].mean() for tag in torch.unique(slices).tolist()}


class _Examples(Dataset):
    """Examples stored compactly (int16/int32); items are indices, gathered and widened per batch."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, slices: torch.Tensor) -> None:
        self.inputs, self.labels, self.slices = inputs, labels, slices

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, index: int) -> int:
        return index

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {
            "input_ids": self.inputs[idx].long(),
            "labels": self.labels[idx].long(),
            "slice": self.slices[idx].long(),
        }


class MQARDataModule(L.LightningDataModule):
    """MQAR train and test sets over several numbers of key-value pairs (the slices).

    Args:
        vocab_size: V (the model's vocabulary).
        seq_len: T of every example.
        train_num_kv_pairs: K of each training slice.
        test_num_kv_pairs: K of each test (and validation) slice.
        num_train_examples: examples per training slice.
        num_test_examples: examples per test slice.
        num_val_examples: examples per validation slice, drawn from a stream of their own. 0: validation
            uses the test set (then choosing hyper-parameters by validation accuracy is choosing them on test).
        power_a: exponent parameter of the query-offset power law.
        random_non_queries: random filler tokens instead of 0.
        batch_size: examples per batch and per rank.
        num_workers: data-loader worker processes.
        seed: base seed; train and test use disjoint streams derived from it.

    Attributes:
        vocab_size: as given (the CLI links it into the model config).
        eos_id: None, the task has no documents.
    """

    def __init__(
        self,
        vocab_size: int = 8192,
        seq_len: int = 256,
        train_num_kv_pairs: Sequence[int] = (4, 8, 16, 32, 64),
        test_num_kv_pairs: Sequence[int] = (4, 8, 16, 32, 64),
        num_train_examples: int = 20_000,
        num_test_examples: int = 1_000,
        num_val_examples: int = 0,
        power_a: float = 0.01,
        random_non_queries: bool = True,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not train_num_kv_pairs or not test_num_kv_pairs:
            raise ValueError("train_num_kv_pairs and test_num_kv_pairs must name at least one slice each")
        for k in (*train_num_kv_pairs, *test_num_kv_pairs):
            _check_task(vocab_size, seq_len, int(k))
        for name, value, low in (
            ("num_train_examples", num_train_examples, 1),
            ("num_test_examples", num_test_examples, 1),
            ("num_val_examples", num_val_examples, 0),
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if num_train_examples * len(train_num_kv_pairs) < batch_size:
            raise ValueError(
                f"batch_size={batch_size} exceeds the {num_train_examples * len(train_num_kv_pairs)} training examples"
            )
        self.save_hyperparameters()
        self.vocab_size = vocab_size
        self.eos_id: int | None = None
        self.seq_len = seq_len
        self.train_num_kv_pairs = [int(k) for k in train_num_kv_pairs]
        self.test_num_kv_pairs = [int(k) for k in test_num_kv_pairs]
        self.num_train_examples = num_train_examples
        self.num_test_examples = num_test_examples
        self.num_val_examples = num_val_examples
        self.power_a = power_a
        self.random_non_queries = random_non_queries
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self._sets: dict[str, _Examples] = {}

    def build(self, split: str) -> _Examples:
        """All examples of ``"train"``, ``"val"`` or ``"test"``, slice after slice (deterministic in the seed)."""
        splits = {
            "train": (_TRAIN, self.train_num_kv_pairs, self.num_train_examples),
            "val": (_VAL, self.test_num_kv_pairs, self.num_val_examples),
            "test": (_TEST, self.test_num_kv_pairs, self.num_test_examples),
        }
        if split not in splits:
            raise ValueError(f"split must be one of {sorted(splits)}, got {split!r}")
        split_id, kvs, count = splits[split]
        if count == 0:
            raise ValueError(f"the {split!r} split is empty: set num_val_examples > 0 to build one")
        # -100 and every id fit int16 for small vocabularies: a quarter of the int64 memory.
        store = torch.int16 if self.vocab_size <= torch.iinfo(torch.int16).max else torch.int32
        inputs, labels, slices = [], [], []
        for k in kvs:
            x, y = mqar_batch(
                count, self.vocab_size, self.seq_len, k, (self.seed, split_id, k), self.power_a, self.random_non_queries
            )
            inputs.append(x.to(store))
            labels.append(y.to(store))
            slices.append(torch.full((count,), k, dtype=torch.int16))
        return _Examples(torch.cat(inputs), torch.cat(labels), torch.cat(slices))

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and "train" not in self._sets:
            self._sets["train"] = self.build("train")
        if "test" not in self._sets:
            self._sets["test"] = self.build("test")
        if stage in (None, "fit", "validate") and self.num_val_examples > 0 and "val" not in self._sets:
            self._sets["val"] = self.build("val")

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self._sets:
            self._sets[split] = self.build(split)
        examples = self._sets[split]
        return DataLoader(
            examples,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.num_workers,
            collate_fn=examples.collate,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val" if self.num_val_examples > 0 else "test", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
