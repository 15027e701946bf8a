"""Memory-lean RMSNorm and SwiGLU MLP of the model blocks: autograd functions that keep only their bf16 inputs
(plus one fp32 scalar per row) for the backward and recompute the rest there.

Plain autograd of ``RMSNorm`` keeps fp32 copies of its input and output (6x the bytes of a bf16 input), and the
SwiGLU MLP keeps gate, up, SiLU(gate) and their product. Here the norm keeps x and 1/rms, the MLP keeps the
gate|up projection only. On CUDA the elementwise bodies run through ``torch.compile`` (one fused kernel each
instead of a pass per operation); elsewhere eagerly. Same arithmetic as the plain modules: fp32 inside, the
output rounded once to the input dtype.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from mom_lit.norm import RMSNorm

__all__ = ["FusedRMSNorm", "maybe_compiled", "rms_norm", "swiglu_mlp"]

_COMPILED: dict = {}


def maybe_compiled(fn, tensor: torch.Tensor):
    """``torch.compile``d ``fn`` for CUDA tensors (built once), ``fn`` itself elsewhere. A compiler that fails
    (at build or at its first call) is turned off for the process with a warning: the eager body gives the same
    result, only slower."""
    if not tensor.is_cuda or _COMPILED.get("disabled"):
        return fn
    if fn not in _COMPILED:
        try:
            compiled = torch.compile(fn)
        except Exception as error:  # pragma: no cover - depends on the installation
            _disable(error)
            return fn

        def run(*args):
            if _COMPILED.get("disabled"):
                return fn(*args)
            try:
                return compiled(*args)
            except Exception as error:  # pragma: no cover - depends on the installation
                _disable(error)
                return fn(*args)

        _COMPILED[fn] = run
    return _COMPILED[fn]


def _disable(error: Exception) -> None:
    _COMPILED["disabled"] = True
    warnings.warn(f"torch.compile failed ({type(error).__name__}: {error}); the fused norm, MLP and loss bodies "
                  "run eagerly", RuntimeWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------------- RMSNorm
def _norm_fwd(x, weight, eps: float):
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (R, 1)
    return (x32 * rstd * weight.float()).to(x.dtype), rstd


def _norm_bwd(dy, x, weight, rstd):
    n = x.float() * rstd  # normalised input
    d = dy.float()
    dw = (d * n).sum(0)
    dn = d * weight.float()
    dx = rstd * (dn - n * (dn * n).mean(-1, keepdim=True))
    return dx.to(x.dtype), dw


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = maybe_compiled(_norm_fwd, x)(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = maybe_compiled(_norm_bwd, x)(dy.contiguous(), x, weight, rstd)
        return dx, dw.to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x) * weight`` over the last dim, as :class:`mom_lit.norm.RMSNorm`. x: (..., D); weight: (D,)."""
    shape = x.shape
    return _RMSNorm.apply(x.reshape(-1, shape[-1]).contiguous(), weight, eps).view(shape)  # via (R, D)


# ------------------------------------------------------------------------------------------------- SwiGLU
def _glu_fwd(h):
    gate, up = h.chunk(2, dim=-1)
    return (F.silu(gate.float()) * up.float()).to(h.dtype)


def _glu_bwd(dp, h):
    gate, up = h.float().chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    d = dp.float()
    dgate = d * up * sig * (1 + gate * (1 - sig))  # d silu(g) / dg = s (1 + g (1 - s))
    return torch.cat([dgate, d * gate * sig], dim=-1).to(h.dtype)


class _SwiGLUDown(torch.autograd.Function):
    """``silu(gate) * up @ w_down.T`` from the gate|up projection h; keeps h only (the product is recomputed)."""

    @staticmethod
    def forward(ctx, h, w_down):
        p = maybe_compiled(_glu_fwd, h)(h)  # (R, I)
        ctx.save_for_backward(h, w_down)
        return p @ w_down.t()

    @staticmethod
    def backward(ctx, dout):
        h, w_down = ctx.saved_tensors
        p = maybe_compiled(_glu_fwd, h)(h)
        # The backward runs outside autocast: under mixed precision dout and h are bf16 while the weight is fp32,
        # so the products take the activations' dtype (as the autocast forward did) and dw the weight's.
        dw = (dout.t() @ p.to(dout.dtype)).to(w_down.dtype) if ctx.needs_input_grad[1] else None  # (D, I)
        dh = (maybe_compiled(_glu_bwd, h)(dout @ w_down.to(dout.dtype), h)
              if ctx.needs_input_grad[0] else None)
        return dh, dw


def swiglu_mlp(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """``down(silu(gate) * up)`` with ``gate | up = x @ w_gate_up.T``. x: (..., D); w_gate_up: (2I, D);
    w_down: (D, I)."""
    shape = x.shape
    h = x.reshape(-1, shape[-1]) @ w_gate_up.t()  # (R, 2I)
    return _SwiGLUDown.apply(h, w_down).view(*shape[:-1], w_down.shape[0])


class FusedRMSNorm(RMSNorm):
    """:class:`mom_lit.norm.RMSNorm` (same parameter, same output) through :func:`rms_norm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
