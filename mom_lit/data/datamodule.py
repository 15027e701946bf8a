"""``TextDataModule``: streams prepared token chunks into batches of the training contract.

Data come from a folder written by :func:`mom_lit.data.prepare.prepare_dataset` (``mom-lit prepare``)
or, by default, from the embedded Shakespeare corpus, prepared on first use. Rows are non-overlapping blocks
of ``seq_len + 1`` consecutive tokens (``input_ids`` = the first ``seq_len``, ``labels`` = the last
``seq_len``); see :mod:`mom_lit.data.packing` for the batch contract and the document-boundary convention.

litdata shards the blocks over ranks, nodes and loader workers from the distributed environment and drops
the remainder so every rank gets the same number of full batches. The train loader's position is part of
the datamodule's ``state_dict`` and so of every Lightning checkpoint: a resumed run continues mid-epoch with
the batches it had not seen, and every later epoch is the one an uninterrupted run would have seen (with the
same ``num_workers``; see :meth:`TextDataModule.load_state_dict` for another number).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset, TokensLoader

from mom_lit.data import remote
from mom_lit.data.packing import TokenBlockCollate
from mom_lit.data.prepared import SPLITS, read_meta, recorded_tokenizer
from mom_lit.data.shakespeare import ensure_shakespeare, shakespeare_dir
from mom_lit.data.tokenizers import load_tokenizer

__all__ = ["TextDataModule"]

logger = logging.getLogger("mom_lit")


class _ResumableLoader(StreamingDataLoader):
    """A StreamingDataLoader whose loaded state applies to the next epoch only, and once.

    litdata resumes from a loaded state while its ``restore`` flag is set, and clears the flag only when an
    epoch's generator runs to its end (https://github.com/Lightning-AI/litData/pull/851 is about the same flag).
    Lightning ends an epoch of a sized loader after ``len()`` batches without asking for the next one, so a
    resumed epoch never clears it and the next epoch would replay the resumed one from the loaded position.
    Here an epoch begun without a state loaded since the previous one began is always a fresh epoch.

    Lightning also restores a stateful train loader from its fit-loop state in addition to the datamodule hook.
    Each litdata restore advances the loader's cycle over worker ids, so a second restore of the same state
    leaves the worker position it records wrong. A repeated restore before iteration is therefore ignored.
    """

    _restored_state: dict[str, Any] | None = None

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        if self._restored_state is not None and obj == self._restored_state:
            return
        super().load_state_dict(obj)
        self._restored_state = copy.deepcopy(obj)

    def __iter__(self) -> Any:
        if self._restored_state is None:
            self.restore = False  # no state was loaded for this epoch: litdata starts it afresh
        self._restored_state = None
        yield from super().__iter__()


class TextDataModule(L.LightningDataModule):
    """Token batches from litdata chunks: ``input_ids``, ``labels`` (B, T) int64, optionally ``cu_seqlens``.

    Args:
        data_dir: folder with ``train/`` and ``val/`` (and optionally ``test/``) prepared splits, or the URL of
            one that litdata streams (``s3://``, ``gs://`` ...; its metadata is checked through fsspec); None uses
            the embedded Shakespeare corpus, prepared on first use into ``cache_dir``.
        tokenizer: ``"byte"``, a ``tokenizer.json`` path or a locally cached hub name; must match the tokenizer
            the data were prepared with. None takes the ``tokenizer.json`` recorded in ``data_dir``'s metadata
            (``"byte"`` if none is); the resolved spec is what the hyper-parameters (and checkpoints) record.
        seq_len: tokens per row (T); each row reads ``seq_len + 1`` tokens so labels are the next tokens.
        batch_size: rows per batch and per rank (B).
        num_workers: data-loader worker processes per rank (0 loads in the main process).
        pack_documents: emit ``cu_seqlens`` so that no sequence-mixing segment spans two documents.
        seed: seed of litdata's shuffling (same on every rank; litdata splits the shuffled blocks).
        shuffle: shuffle the training blocks every epoch (validation and test are never shuffled).
        eos_token: end-of-document token of a ``tokenizer.json`` without a standard one.
        cache_dir: where the embedded corpus is prepared (default ``$MOM_LIT_CACHE`` or ``~/.cache/mom_lit``).

    Attributes:
        vocab_size: rows the model's embedding needs (padded tokenizer vocabulary), known right after init.
        eos_id: the end-of-document id.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        tokenizer: str | None = None,
        seq_len: int = 512,
        batch_size: int = 8,
        num_workers: int = 0,
        pack_documents: bool = True,
        seed: int = 42,
        shuffle: bool = True,
        eos_token: str | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("seq_len", seq_len, 1),
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if isinstance(data_dir, str) and data_dir.startswith("file://"):
            data_dir = data_dir[len("file://"):]  # a local folder: litdata reads it as one
        if data_dir is not None and not remote.isdir(data_dir):
            raise FileNotFoundError(f"data_dir {data_dir} does not exist (or is not a folder)")
        if tokenizer is None:
            tokenizer = recorded_tokenizer(data_dir) if data_dir is not None else "byte"
        self.save_hyperparameters()
        self.hparams["tokenizer"] = tokenizer  # the command line saves its given arguments: record the resolved one
        self.tokenizer = load_tokenizer(tokenizer, eos_token=eos_token)
        self.vocab_size: int = self.tokenizer.vocab_size
        self.eos_id: int = self.tokenizer.eos_id
        self.data_dir: Path | str | None = None  # a URL stays a string
        if data_dir is not None:
            self.data_dir = data_dir if remote.is_url(data_dir) else Path(data_dir).expanduser().resolve()
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pack_documents = pack_documents
        self.seed = seed
        self.shuffle = shuffle
        self.cache_dir = cache_dir
        self.collate = TokenBlockCollate(self.eos_id, pack_documents, self.vocab_size)
        self._datasets: dict[str, StreamingDataset] = {}
        self._train_loader: _ResumableLoader | None = None
        self._pending_train_state: dict[str, Any] | None = None

    # ----------------------------------------------------------------------------------------------- data
    _STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}

    @property
    def root(self) -> Path | str:
        """The folder (or URL) holding the split folders."""
        if self.data_dir is not None:
            return self.data_dir
        return shakespeare_dir(self.tokenizer, self.cache_dir)

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node; ensure_shakespeare also locks for callers that don't.
        if self.data_dir is None:
            ensure_shakespeare(self.tokenizer, self.cache_dir)

    def _check_meta(self, split_dir: Path | str) -> dict[str, Any]:
        meta = read_meta(split_dir)
        expected = {
            "tokenizer_fingerprint": self.tokenizer.fingerprint,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
        }
        wrong = {key: meta.get(key) for key, value in expected.items() if meta.get(key) != value}
        if wrong:
            raise ValueError(
                f"{split_dir} was prepared with tokenizer {meta.get('tokenizer')!r} ({wrong}), but this datamodule "
                f"uses {self.tokenizer.name!r} ({ {k: expected[k] for k in wrong} }); prepare the data again with "
                "this tokenizer or pass the tokenizer it was prepared with"
            )
        return meta

    def _split_dir(self, split: str) -> Path | str:
        split_dir = remote.join(self.root, split)
        if not remote.isdir(split_dir):
            raise FileNotFoundError(
                f"{self.root} has no {split!r} split (found "
                f"{[s for s in SPLITS if remote.isdir(remote.join(self.root, s))]}); "
                f"prepare it (mom-lit prepare, --val_fraction/--test_fraction) or disable that stage"
            )
        return split_dir

    def _too_small(self, split: str, num_tokens: int, rows: int, where: str) -> ValueError:
        return ValueError(
            f"split {split!r} of {self.root} is too small: {num_tokens} tokens give {rows} rows of "
            f"seq_len+1={self.seq_len + 1} tokens{where}, fewer than batch_size={self.batch_size}; "
            "use more data, a shorter seq_len or a smaller batch_size"
        )

    def check(self, stage: str | None = "fit") -> None:
        """Raises the errors of :meth:`setup` that need no dataset: a split of the stage missing, prepared with
        another tokenizer, too small for one batch even on a single rank, or holding token ids outside the
        vocabulary. Reads the metadata and one pass over the tokens; the command line calls it before the run
        writes anything. The embedded corpus (prepared on first use) is skipped."""
        if self.data_dir is None:
            return
        for split in self._STAGE_SPLITS.get(stage or "fit", ()):
            split_dir = self._split_dir(split)
            meta = self._check_meta(split_dir)
            rows = int(meta["num_tokens"]) // (self.seq_len + 1)
            if rows < self.batch_size:
                raise self._too_small(split, meta["num_tokens"], rows, "")
            self._check_token_range(split_dir, meta)

    def _check_token_range(self, split_dir: Path | str, meta: dict[str, Any]) -> None:
        """Raises naming the chunk file when a stored token id lies outside ``[0, vocab_size)``. Reads every
        token of the split once, memory-mapped (litdata's token chunk: a uint32 item count, ``count + 1``
        uint32 offsets, then the tokens); a layout it does not know, and a split behind a URL (the check would
        download it whole), are left to the collate's check."""
        if remote.is_url(split_dir):
            return
        index = json.loads((split_dir / "index.json").read_text())
        config = index.get("config") or {}
        if config.get("compression") or "dtype" not in meta:
            return
        dtype = np.dtype(meta["dtype"])
        step = 1 << 24  # tokens per read
        for chunk in index.get("chunks", []):
            path, count = split_dir / chunk["filename"], chunk.get("dim")
            header = (int(chunk["chunk_size"]) + 2) * 4
            if count is None or not path.is_file() or path.stat().st_size != header + int(count) * dtype.itemsize:
                continue
            if int(count) == 0:
                continue
            tokens = np.memmap(path, dtype=dtype, mode="r", offset=header, shape=(int(count),))
            for start in range(0, int(count), step):
                part = tokens[start:start + step]
                low, high = int(part.min()), int(part.max())
                if low < 0 or high >= self.vocab_size:
                    raise ValueError(
                        f"{path} holds token ids outside the vocabulary [0, {self.vocab_size}) of tokenizer "
                        f"{self.tokenizer.name!r} (min {low}, max {high} among its tokens {start}.."
                        f"{start + len(part) - 1}); "
                        "prepare the data again with this tokenizer"
                    )

    def _dataset(self, split: str, shuffle: bool) -> StreamingDataset:
        split_dir = self._split_dir(split)
        meta = self._check_meta(split_dir)
        dataset = StreamingDataset(
            input_dir=str(split_dir),
            item_loader=TokensLoader(block_size=self.seq_len + 1),
            shuffle=shuffle,
            drop_last=True,
            seed=self.seed,
        )
        blocks = len(dataset)
        if blocks < self.batch_size:
            raise self._too_small(split, meta["num_tokens"], blocks, " on this rank")
        return dataset

    def setup(self, stage: str | None = None) -> None:
        if self.data_dir is None:
            ensure_shakespeare(self.tokenizer, self.cache_dir)  # a no-op once prepare_data has run
        for split in self._STAGE_SPLITS.get(stage or "fit", ()):
            if split not in self._datasets:
                self._datasets[split] = self._dataset(split, shuffle=self.shuffle and split == "train")

    def _loader(self, split: str, cls: type[StreamingDataLoader] = StreamingDataLoader) -> StreamingDataLoader:
        if split not in self._datasets:
            self._datasets[split] = self._dataset(split, shuffle=self.shuffle and split == "train")
        return cls(
            self._datasets[split],
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> StreamingDataLoader:
        loader = self._loader("train", _ResumableLoader)
        assert isinstance(loader, _ResumableLoader)
        if self._pending_train_state is not None:
            loader.load_state_dict(self._pending_train_state)
            self._pending_train_state = None
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> StreamingDataLoader:
        return self._loader("val")

    def test_dataloader(self) -> StreamingDataLoader:
        return self._loader("test")

    # ------------------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """Position of the train loader (litdata's state), saved into Lightning checkpoints."""
        if self._train_loader is not None:
            return {"train_loader": self._train_loader.state_dict()}
        if self._pending_train_state is not None:
            return {"train_loader": self._pending_train_state}
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Remember the train loader's position; applied when ``train_dataloader`` builds the loader.

        With another ``num_workers`` than the checkpoint's, litdata deals the epoch's remaining blocks over the
        new workers and each drops its last partial batch: a warning says how many blocks may be skipped.
        """
        state = state_dict.get("train_loader")
        if state is None:
            return
        dataset_state = state.get("dataset", {})
        saved_workers = dataset_state.get("num_workers")
        if saved_workers is not None and max(saved_workers, 1) != max(self.num_workers, 1) \
                and dataset_state.get("sample_in_epoch", 0) > 0:
            logger.warning(
                "resuming mid-epoch with num_workers=%d, the checkpoint was written with %d: litdata deals the "
                "epoch's remaining blocks over the new workers and each drops its last partial batch, so up to "
                "%d blocks of this epoch may be skipped (later epochs are whole); resume with num_workers=%d "
                "to continue exactly", self.num_workers, saved_workers,
                max(self.num_workers, 1) * (self.batch_size - 1), saved_workers)
        if self._train_loader is not None:
            self._train_loader.load_state_dict(state)
        else:
            self._pending_train_state = state
