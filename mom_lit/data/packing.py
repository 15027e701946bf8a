"""Turning blocks of ``seq_len + 1`` streamed tokens into training batches.

Batch contract (what the LightningModule consumes):

* ``input_ids`` (B, T) int64 and ``labels`` (B, T) int64 with ``labels[:, t]`` the target of position ``t``
  (the stream is already shifted by one; -100 would mean "ignored", text batches have none).
* with document-aware packing, ``cu_seqlens`` (N + 1,) int32 over the flattened batch (1, B * T): a segment
  starts at every row start and at every token that follows an EOS, so no segment spans two rows or two
  documents.

Targets across a document boundary: the EOS closing a document keeps the next document's first token as its
target. The EOS is the last token of its segment, so under packing that prediction is made without any context
from the new document: it learns the distribution of document openings, the role a BOS token plays elsewhere.
The labels are identical with packing on and off, so losses of both modes are comparable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["TokenBlockCollate", "document_cu_seqlens"]


def document_cu_seqlens(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Segment boundaries of the flattened batch: every row start and every token right after an EOS.

    Args:
        input_ids: (B, T) token ids.
        eos_id: the end-of-document id.

    Returns:
        (N + 1,) int32, starting at 0 and ending at ``B * T``, strictly increasing.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    batch, seq_len = input_ids.shape
    starts = torch.zeros(batch, seq_len, dtype=torch.bool, device=input_ids.device)  # (B, T)
    starts[:, 0] = True
    starts[:, 1:] = input_ids[:, :-1] == eos_id
    offsets = starts.flatten().nonzero().squeeze(1)  # (N,) positions in the flattened (B * T) batch
    end = torch.tensor([batch * seq_len], dtype=offsets.dtype, device=offsets.device)
    return torch.cat([offsets, end]).to(torch.int32)


class TokenBlockCollate:
    """Collate ``seq_len + 1``-token blocks (uint16/int32 from the stream) into the batch contract above.

    A plain class rather than a closure so that data-loader worker processes can pickle it.
    """

    def __init__(self, eos_id: int, pack_documents: bool, vocab_size: int | None = None) -> None:
        self.eos_id = int(eos_id)
        self.pack_documents = bool(pack_documents)
        self.vocab_size = vocab_size

    def __call__(self, blocks: Sequence[Any]) -> dict[str, torch.Tensor]:
        # torch's uint16 supports little arithmetic: widen before slicing and comparing.
        tokens = torch.stack([torch.as_tensor(b) for b in blocks])
        tokens = tokens.long()  # (B, T + 1)
        # Checked here, on the host, where it costs no device synchronisation (an id out of range would
        # otherwise fail inside the embedding on the GPU with an opaque device-side assertion).
        if self.vocab_size is not None and tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"the data hold token ids outside the vocabulary [0, {self.vocab_size}): min "
                             f"{int(tokens.min())}, max {int(tokens.max())}; the prepared chunks are damaged or were "
                             "written with another tokenizer")
        batch = {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}  # (B, T) each
        if self.pack_documents:
            batch["cu_seqlens"] = document_cu_seqlens(batch["input_ids"], self.eos_id)
        return batch
