"""Fixtures shared by several test modules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mom_lit.data.prepare import prepare_dataset

# The shape of `four_batch_epochs`' batches: rows of SEQ_LEN + 1 tokens, BATCH_SIZE rows per batch.
SEQ_LEN, BATCH_SIZE = 32, 4
BATCHES_PER_EPOCH = 4


@pytest.fixture
def one_thread():
    """Tiny models: a second thread only adds synchronisation, and the test machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def four_batch_epochs(tmp_path_factory) -> Path:
    """Byte-level data whose train split holds 17 blocks of ``SEQ_LEN + 1`` tokens (4 batches of 4 per epoch,
    one block dropped) and whose val split holds one batch."""
    root = tmp_path_factory.mktemp("epochs")
    source = root / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": f"document {i}: " + "tiny words " * 4}) + "\n" for i in range(13)))
    meta = prepare_dataset(source, root / "prepared", val_fraction=0.25, seed=0, verbose=False)
    assert meta["train"]["num_tokens"] // (SEQ_LEN + 1) == 17 and meta["val"]["num_tokens"] // (SEQ_LEN + 1) == 5
    return root / "prepared"
