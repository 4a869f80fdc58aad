"""A per-layer direction for LoRA adapters of any rank.

A rank-1 LoRA's update is ``B @ A`` with B a (d_out, 1) column and A a (1, d_in) row, so its trajectory
is simply the B (or A) vector over steps. For rank r > 1 the trajectory metrics need one vector per layer:
we track the top singular triple (u, s, v) of the update ``B @ A`` (the LoRA scaling alpha/r is *not*
applied). ``u`` (d_out) is the output direction the adapter writes most strongly, ``v`` (d_in) the input
direction it reads, ``s`` the strength. Record ``s * u`` as the trajectory vector to get a rank-1-like
path whose norm grows with the adapter, or ``u`` for a pure direction.

Singular vectors are defined only up to a joint sign flip of (u, v). To keep a recorded trajectory from
jumping between u and -u, the sign is fixed deterministically: u points along ``reference`` when one is
given (pass the previous step's u), otherwise u's largest-|entry| component is positive (the first such
entry on ties; v's when u is zero).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["LoRADirection", "lora_direction", "canonical_sign"]

_F64 = torch.float64


class LoRADirection(NamedTuple):
    u: Tensor  # (d_out,) unit vector, or zeros when B @ A is zero
    v: Tensor  # (d_in,) unit vector, or zeros when B @ A is zero (rank 1: A / |A| if A is non-zero)
    s: float  # top singular value of B @ A


def canonical_sign(x: Tensor) -> float:
    """+1.0 or -1.0 so that ``sign * x`` has its largest-|entry| component positive (+1.0 for zeros)."""
    if x.numel() == 0:
        return 1.0
    flat = x.reshape(-1)
    return -1.0 if float(flat[int(flat.abs().argmax())]) < 0 else 1.0


def lora_direction(A: Tensor, B: Tensor, reference: Tensor | None = None) -> LoRADirection:
    """Top singular triple of ``B @ A`` for LoRA factors A (r, d_in) and B (d_out, r).

    Never forms the (d_out, d_in) product: with B = Qb Rb and A^T = Qa Ra (thin QR),
    B @ A = Qb (Rb Ra^T) Qa^T, so an SVD of the small r x r core gives the triple in
    O((d_out + d_in) r^2). For rank 1 this is u = B / |B|, v = A / |A|, s = |B| |A|, with the sign
    convention of the module docstring applied to both.
    """
    if A.ndim != 2 or B.ndim != 2:
        raise ValueError(f"A must be (r, d_in) and B (d_out, r); got shapes {tuple(A.shape)} and {tuple(B.shape)}")
    if A.shape[0] != B.shape[1] or A.shape[0] == 0:
        raise ValueError(f"rank mismatch: A is {tuple(A.shape)} (r, d_in) but B is {tuple(B.shape)} (d_out, r)")
    out_dtype = B.dtype if B.is_floating_point() else torch.get_default_dtype()
    a = A.detach().to("cpu", _F64)
    b = B.detach().to("cpu", _F64)

    if a.shape[0] == 1:
        na, nb = a[0].norm(), b[:, 0].norm()
        # B starts at zero in LoRA: keep A's direction, which is meaningful, and a zero u.
        u = b[:, 0] / nb if nb > 0 else torch.zeros_like(b[:, 0])
        v = a[0] / na if na > 0 else torch.zeros_like(a[0])
        s = float(na * nb)
    else:
        qb, rb = torch.linalg.qr(b)
        qa, ra = torch.linalg.qr(a.T)
        uc, sc, vch = torch.linalg.svd(rb @ ra.T)
        s = float(sc[0])
        if s > 0:
            u, v = qb @ uc[:, 0], qa @ vch[0]
        else:
            u, v = torch.zeros(b.shape[0], dtype=_F64), torch.zeros(a.shape[1], dtype=_F64)

    sign = 0.0
    if reference is not None:
        ref = reference.detach().reshape(-1).to("cpu", _F64)
        if ref.shape != u.shape:
            raise ValueError(f"reference must have {u.numel()} entries (d_out), got {ref.numel()}")
        dot = float(u @ ref)
        sign = 1.0 if dot > 0 else -1.0 if dot < 0 else 0.0
    if sign == 0.0:  # no reference, or it is orthogonal to u
        sign = canonical_sign(u) if bool(u.any()) else canonical_sign(v)
    return LoRADirection((sign * u).to(B.device, out_dtype), (sign * v).to(A.device, out_dtype), s)
