"""Model FLOPs per trained token of a MoM language model, for throughput and MFU logging.

Counts the useful arithmetic only: the projections of the memories a token was routed to (top-k plus the
shared one), not the memories it skipped, and a chunked-scan estimate for the recurrence. Backward costs
twice the forward, so a training token costs three forwards. Activation recomputation is not counted (MFU,
not hardware utilisation).
"""

from __future__ import annotations

from mom_lit.config import MoMConfig
from mom_lit.plan import reference_chunk_size


def active_streams(config: MoMConfig) -> int:
    """Memories every token writes to and reads from: its routed ones plus the shared memory."""
    routed = config.topk if config.has_router else 1
    return routed + int(config.shared_memory)


def memory_parameters(config: MoMConfig) -> int:
    """Parameters of one memory of one layer: its key, value, beta and decay-gate projections (and the low-rank
    gate of the ``gla`` rule, with its bias). The query, output and gate projections and the short convolution
    are shared."""
    c = config
    width = c.key_dim + c.value_dim
    if c.update_rule in ("gated_delta", "delta"):
        width += c.num_heads  # beta
    if c.update_rule in ("gated_delta", "simple_gla"):
        width += c.num_heads  # scalar decay gate
    params = c.hidden_size * width
    if c.update_rule == "gla":
        params += c.gla_gate_rank * (c.hidden_size + c.key_dim) + c.key_dim  # down, up, bias
    return params


def active_parameters(config: MoMConfig, total: int) -> int:
    """Parameters a token passes through, out of a model's ``total``: the routed memories it skipped are left out
    (``num_layers * (num_memories - topk)`` memories)."""
    if not config.has_router:
        return total
    return total - config.num_layers * (config.num_memories - config.topk) * memory_parameters(config)


def matmul_flops_per_token(config: MoMConfig) -> int:
    """Forward multiply-adds (x2) of every weight matrix a token passes through, LM head included."""
    c = config
    hidden, heads = c.hidden_size, c.num_heads
    stream_width = c.key_dim + c.value_dim  # k and v projections of one memory
    if c.update_rule in ("gated_delta", "delta"):
        stream_width += heads  # beta
    if c.update_rule in ("gated_delta", "simple_gla"):
        stream_width += heads  # scalar decay gate
    per_layer = hidden * c.key_dim  # q
    per_layer += active_streams(c) * hidden * stream_width
    if c.update_rule == "gla":
        # Low-rank per-key gate: down to the rank, then up to the key width, per active memory.
        per_layer += active_streams(c) * c.gla_gate_rank * (hidden + c.key_dim)
    if c.has_router:
        per_layer += hidden * c.num_memories
    if c.conv_size > 0:
        per_layer += active_streams(c) * c.conv_size * (2 * c.key_dim + c.value_dim)
    if c.use_output_gate:
        per_layer += hidden * c.value_dim
    per_layer += c.value_dim * hidden  # output projection
    per_layer += 3 * hidden * c.mlp_hidden_size  # SwiGLU: gate+up (2F x D) and down (D x F)
    return 2 * (c.num_layers * per_layer + hidden * c.vocab_size)


def scan_flops_per_token(config: MoMConfig, chunk_size: int | None = None) -> int:
    """Forward FLOPs of the chunked recurrence per token, summed over heads, active memories and layers.

    Per head and chunk of C tokens, a token costs its share of the inter-chunk state products (read q S, the
    state update k^T v, plus k S for the delta rules: 2 K V each) and of the intra-chunk (C x C) products
    over keys and values (2 C (K + V)). ``chunk_size``: the chunk length of the scan that runs
    (``ExecutionPlan.chunk_size``: the Triton tile on GPUs); default the chunked reference's
    (:func:`mom_lit.plan.reference_chunk_size`).
    """
    c = config
    k, v = c.head_dim, c.head_v_dim
    state_products = 3 if c.update_rule in ("gated_delta", "delta") else 2
    chunk = reference_chunk_size(c) if chunk_size is None else chunk_size
    per_head = 2 * state_products * k * v + 2 * chunk * (k + v)
    return c.num_layers * active_streams(c) * c.num_heads * per_head


def training_flops_per_token(config: MoMConfig, chunk_size: int | None = None) -> int:
    """Forward + backward FLOPs per trained token (backward = 2x forward); ``chunk_size`` as
    :func:`scan_flops_per_token`."""
    return 3 * (matmul_flops_per_token(config) + scan_flops_per_token(config, chunk_size))
