"""Per-memory projections of the slots as one grouped matrix product over the memory-sorted layout.

The sorted layout keeps each memory's slots contiguous (``layout.py``), so slot i of memory m needs ``x[token[i]]
@ W[m]^T``: one ``torch._grouped_mm`` with group ends at the memory boundaries does the projections of all
memories without a loop and without projecting a token for memories it did not select. Its backward is two more
grouped products (input and weight gradients); the input gradient of a token adds its J slots through the
inverse slot permutation (a Triton gather-sum, never a scatter-add: this path runs next to the slot kernels).
The autograd function around them is the slot stage's (``mom_lit.ops.slots.stage.projected_slot_conv``).
"""

from __future__ import annotations

import torch


# CUDA majors with torch's grouped kernels (Hopper, Blackwell datacenter). Elsewhere ``torch._grouped_mm`` falls
# back to a loop over the groups that reads their sizes on the host: a synchronisation in every step, and slower.
_GROUPED_KERNEL_MAJORS = (9, 10)


def grouped_kernels_on(device: torch.device) -> bool:
    """Whether ``torch._grouped_mm`` runs as one grouped kernel, without a host synchronisation, on ``device``."""
    if device.type != "cuda":
        return device.type == "cpu"
    return torch.cuda.get_device_capability(device)[0] in _GROUPED_KERNEL_MAJORS


def grouped_mm_available(device: torch.device, dtype: torch.dtype, in_features: int, out_features: int) -> bool:
    """Whether ``torch._grouped_mm`` takes (rows, in_features) operands of ``dtype`` on ``device`` as one sync-free
    grouped kernel: bf16 on a CUDA device with grouped kernels (fp32 or bf16 on CPU), rows of the input and of the
    output a multiple of 16 bytes (its kernels require 16-byte strides)."""
    device = torch.device(device)
    if not hasattr(torch, "_grouped_mm") or not grouped_kernels_on(device):
        return False
    dtypes = (torch.bfloat16,) if device.type == "cuda" else (torch.float32, torch.bfloat16)
    row_bytes = torch.empty((), dtype=dtype).element_size()
    return dtype in dtypes and (in_features * row_bytes) % 16 == 0 and (out_features * row_bytes) % 16 == 0


def project_slots(x: torch.Tensor, weight: torch.Tensor, token: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """(L, P) ``x[token[i]] @ weight[m]^T`` of the sorted slots, without autograd."""
    return torch._grouped_mm(x[token], weight.transpose(1, 2), offs=ends)


def project_slots_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, token: torch.Tensor,
                           rank: torch.Tensor, ends: torch.Tensor, launch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (N_tok, D) of x and (S, P, D) of weight from the (L, P) gradient of :func:`project_slots`."""
    from mom_lit.ops.slots.kernels import slot_sum  # Triton is imported only where its kernels run

    dy = dy.contiguous()
    dx_slot = torch._grouped_mm(dy, weight, offs=ends)  # (L, D)
    dx = slot_sum(dx_slot, rank, x.shape[0], launch)  # (L, D) -> (N_tok, D): a token's J slots, read through rank
    dweight = torch._grouped_mm(dy.t(), x[token], offs=ends)  # (S, P, D); empty groups give zeros
    return dx, dweight
