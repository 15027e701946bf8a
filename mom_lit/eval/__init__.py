"""Evaluation: token scoring of packed or chunked sequences, loss against context length (``mom-lit evaluate
length``), and the lm-evaluation-harness model ``mom_lit`` (:mod:`mom_lit.eval.lm_eval_adapter`, needs
``pip install lm_eval``; ``mom-lit evaluate`` runs lm_eval's command line with it registered)."""

from mom_lit.eval.length import PositionLoss, bucket_edges, position_loss
from mom_lit.eval.scoring import TokenScores, pack_batches, score_continuations

__all__ = ["PositionLoss", "TokenScores", "bucket_edges", "pack_batches", "position_loss", "score_continuations"]
