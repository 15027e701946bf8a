"""Data: tokenisers, preparation of token chunks, the text and MQAR datamodules.

Names are imported lazily: tokenising worker processes import ``mom_lit.data.prepare`` and should not pay
for importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ByteTokenizer": "mom_lit.data.tokenizers",
    "HFTokenizer": "mom_lit.data.tokenizers",
    "Tokenizer": "mom_lit.data.tokenizers",
    "load_tokenizer": "mom_lit.data.tokenizers",
    "TokenBlockCollate": "mom_lit.data.packing",
    "document_cu_seqlens": "mom_lit.data.packing",
    "prepare_dataset": "mom_lit.data.prepare",
    "read_meta": "mom_lit.data.prepared",
    "ensure_shakespeare": "mom_lit.data.shakespeare",
    "TextDataModule": "mom_lit.data.datamodule",
    "MQARDataModule": "mom_lit.data.mqar",
    "mqar_accuracy": "mom_lit.data.mqar",
    "mqar_accuracy_by_slice": "mom_lit.data.mqar",
    "mqar_batch": "mom_lit.data.mqar",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mom_lit.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
