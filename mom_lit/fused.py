"""Memory-lean RMSNorm and SwiGLU MLP of the model blocks: autograd functions that keep only their bf16 inputs
(plus one fp32 scalar per row) for the backward and recompute the rest there.

Plain autograd of ``RMSNorm`` keeps fp32 copies of its input and output (6x the bytes of a bf16 input), and the
SwiGLU MLP keeps gate, up, SiLU(gate) and their product. Here the norm keeps x and 1/rms, the MLP keeps the
gate|up projection only. The elementwise bodies run through ``torch.compile`` (one fused kernel each instead of
a pass per operation) where the ``compile`` argument says so (default: on CUDA), elsewhere eagerly. Same arithmetic as the plain modules: fp32 inside, the
output rounded once to the input dtype.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from mom_lit.norm import RMSNorm

__all__ = ["FusedRMSNorm", "compiled_body", "rms_norm", "swiglu_mlp"]


def compiled_body(fn, tensor: torch.Tensor, compile: bool | None = None, eager=None):
    """``fn`` run through ``torch.compile`` where ``compile`` is true (None: for CUDA tensors), else ``eager`` (the
    same arithmetic, rounding for rounding, in fewer passes over memory) or ``fn`` itself.

    The compiled body is built once per function (:func:`_compiled`). A compiler that fails raises, naming the
    way to run these bodies eagerly; the eager body gives the same result, only slower.
    """
    if compile is None:
        compile = tensor.is_cuda
    return _compiled(fn) if compile else (eager or fn)


EAGER_ADVICE = ("run the norm, MLP and loss bodies eagerly with model.configure_paths(compile_blocks=False) (or "
                "resolve_plan(..., compile_blocks=False))")


@functools.cache
def _compiled(fn):
    try:
        compiled = torch.compile(fn)
    except Exception as error:  # noqa: BLE001 - re-raised with the way out
        raise RuntimeError(f"torch.compile of {fn.__name__} failed ({type(error).__name__}: {error}); "
                           f"{EAGER_ADVICE}") from error

    @functools.wraps(fn)
    def run(*args):
        try:
            return compiled(*args)
        except Exception as error:  # noqa: BLE001 - sorted below
            # A failing compiler raises many types (dynamo's own, inductor's, the C++ toolchain's, bare internal
            # assertions): the eager body tells its failures from the body's own errors, which it raises again.
            fn(*args)
            raise RuntimeError(f"torch.compile of {fn.__name__} failed ({type(error).__name__}: {error}); "
                               f"{EAGER_ADVICE}") from error

    return run


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
    def forward(ctx, x, weight, eps, compile):
        y, rstd = compiled_body(_norm_fwd, x, compile)(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.compile = compile
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = compiled_body(_norm_bwd, x, ctx.compile)(dy.contiguous(), x, weight, rstd)
        return dx, dw.to(weight.dtype), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, compile: bool | None = None) -> torch.Tensor:
    """``x / rms(x) * weight`` over the last dim, as :class:`mom_lit.norm.RMSNorm`. x: (..., D); weight: (D,).
    ``compile``: run the elementwise bodies through ``torch.compile`` (None: for CUDA inputs)."""
    shape = x.shape
    return _RMSNorm.apply(x.reshape(-1, shape[-1]).contiguous(), weight, eps, compile).view(shape)  # via (R, D)


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


def _glu_bwd_eager(dp, h):
    """:func:`_glu_bwd` written straight into the two halves of its result, temporaries reused in place (same
    operations, same rounding: products and sums commute exactly)."""
    gate, up = h.float().chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    d = dp.float()
    dh = torch.empty(h.shape, dtype=sig.dtype, device=h.device)  # (R, 2I)
    dgate, dup = dh.chunk(2, dim=-1)
    slope = torch.rsub(sig, 1).mul_(gate).add_(1)  # 1 + gate (1 - sig)
    torch.mul(d, up, out=dgate).mul_(sig).mul_(slope)
    torch.mul(d, gate, out=dup).mul_(sig)
    return dh.to(h.dtype)


class _SwiGLUDown(torch.autograd.Function):
    """``silu(gate) * up @ w_down.T`` from the gate|up projection h; keeps h only (the product is recomputed)."""

    @staticmethod
    def forward(ctx, h, w_down, compile):
        p = compiled_body(_glu_fwd, h, compile)(h)  # (R, I)
        ctx.save_for_backward(h, w_down)
        ctx.compile = compile
        return p @ w_down.t()

    @staticmethod
    def backward(ctx, dout):
        h, w_down = ctx.saved_tensors
        p = compiled_body(_glu_fwd, h, ctx.compile)(h)
        # The backward runs outside autocast: under mixed precision dout and h are bf16 while the weight is fp32,
        # so the products take the activations' dtype (as the autocast forward did) and dw the weight's.
        dw = (dout.t() @ p.to(dout.dtype)).to(w_down.dtype) if ctx.needs_input_grad[1] else None  # (D, I)
        dh = (compiled_body(_glu_bwd, h, ctx.compile, _glu_bwd_eager)(dout @ w_down.to(dout.dtype), h)
              if ctx.needs_input_grad[0] else None)
        return dh, dw, None


def swiglu_mlp(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
               compile: bool | None = None) -> torch.Tensor:
    """``down(silu(gate) * up)`` with ``gate | up = x @ w_gate_up.T``. x: (..., D); w_gate_up: (2I, D);
    w_down: (D, I). ``compile``: run the elementwise bodies through ``torch.compile`` (None: for CUDA inputs)."""
    shape = x.shape
    h = x.reshape(-1, shape[-1]) @ w_gate_up.t()  # (R, 2I)
    return _SwiGLUDown.apply(h, w_down, compile).view(*shape[:-1], w_down.shape[0])


class FusedRMSNorm(RMSNorm):
    """:class:`mom_lit.norm.RMSNorm` (same parameter, same output) through :func:`rms_norm`."""

    def forward(self, x: torch.Tensor, compile: bool | None = None) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, compile)
