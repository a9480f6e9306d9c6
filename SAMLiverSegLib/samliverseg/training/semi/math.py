"""The arithmetic of the Semi-SAM+ trainer (design digest, section 3), as pure functions.

Everything here works on torch tensors whose last three axes are a volume or slab
``(D, H, W)`` = ``[k, j, i]`` (depth along k, rows along j, columns along i); leading axes
are free. Nothing here knows about models, files or ranks, so every formula is unit-tested
against hand-computed values (``tests/test_semi_math.py``).

Pseudo-labels from a prompt ensemble (Algorithm 2)
--------------------------------------------------
``masks`` stacks the M = 2N teacher answers ``M̂_i`` (probabilities in [0, 1], already mapped
back to the original frame with T_j⁻¹) along axis 0. Per voxel v::

    mean(v) = (1/M) Σ_i M̂_i(v)
    Var(v)  = (1/M) Σ_i (M̂_i(v) − mean(v))²           (population variance, in [0, 0.25])
    M_conf(v) = 𝟙[Var(v) < u_th] · valid(v)
    Pseudo(v) = mean(v) · M_conf(v)

``valid`` marks the voxels the teachers were asked about (slices where the student's coarse
mask has at least one voxel: no prompt can be placed elsewhere). A voxel without a teacher vote
is never confident.

Adaptive threshold ("if the teacher's output jitters, raise u_th"): with ``min_confident`` =
q > 0, when fewer than a fraction q of the valid voxels have ``Var < u_th``, the threshold is
raised just above the k-th smallest of their variances, k = ⌈q·n⌉ (n valid voxels), so that at
least k of them pass ``Var < u_eff``, but never above ``u_th_max``::

    u_eff = min(u_th_max, max(u_th, Var_(k) + 1e-6))

This is stateless (a function of the current ensemble only), so it is the same on every rank and
after a resume.

Losses
------
* ``L_rs-con = Σ_v M_conf(v)·(p_s(v) − p_f(v))² / Σ_v M_conf(v)``, with p_s the student's
  probability and p_f the pseudo-label; 0 (still differentiable) when no voxel is confident.
* ``L_con = mean_v (p_s(v) − p_t(v))²``: the mean-teacher consistency between the student's and
  the EMA teacher's probabilities (the teacher side carries no gradient).

Ramps (t in epochs since the start of the semi-supervised phase, fractional within an epoch)
-------------------------------------------------------------------------------------------
* ``λ(t) = λ_max · r(t / T_r)`` with the ramp-up ``r`` chosen by ``kind``:

  - ``"sigmoid"`` (the default): ``r(x) = exp(−5 (1 − clip(x, 0, 1))²)``, the ramp-up of the
    mean-teacher papers (Laine & Aila 2017; Tarvainen & Valpola 2017), whose reference code names
    it ``sigmoid_rampup``. r(0) = e⁻⁵ ≈ 0.0067 and r(1) = 1: the consistency term is nearly off
    while the student still predicts noise and reaches full weight after T_r epochs. The digest
    writes ``sigmoid(t/T_r)``; read literally (the logistic 1/(1 + e^(−t/T_r))) it equals 0.5 at
    t = 0 and only 0.73 at t = T_r, i.e. no ramp-up at all, which contradicts the purpose of a
    ramp-up (and the "T_r = 10 epochs (ramp-up)" of the same line), so the mean-teacher
    sigmoid-shaped ramp is what is implemented;
  - ``"linear"``: ``clip(x, 0, 1)``;
  - ``"logistic"``: ``1 / (1 + exp(−x))``, the literal formula, for those who want it.

* ``β(t) = β_max · exp(−t / T_d)`` (ramp-down of the pseudo-label term).

EMA teacher
-----------
``θ'_t = m_t·θ'_{t−1} + (1 − m_t)·θ_t`` for every floating-point tensor of the state (parameters
and float buffers); integer buffers (counters) are copied from the student. ``m_t = m`` (0.99,
the digest's rule) or, with the warm start of the mean-teacher reference code
(``update_ema_variables``: ``alpha = min(1 − 1/(step + 1), alpha)``),
``m_t = min(m, 1 − 1/t)`` for the t-th update (t = 1, 2, ...): θ'_t is then the plain average of
θ_1…θ_t until t = 1/(1 − m) (100 updates) and the digest's EMA afterwards. Without it θ' keeps
``m^t`` of the random initial decoder (0.99^50 = 61 % after 50 steps), which on a small dataset
means that the selected "best EMA" is mostly the untrained initialisation.

Poly learning rate
------------------
``lr(s) = lr_0 · (1 − s / S)^power`` for step s of S (power 0.9, the nnU-Net/DeepLab schedule).

Point prompts
-------------
``sample_points_per_slice`` draws one pixel uniformly from each non-empty slice of a mask
(x = column i, y = row j, as segment-anything's point prompts); ``sample_point_3d`` one voxel
(k, j, i) of the whole mask.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch
from torch import Tensor

RAMPUPS = ("sigmoid", "linear", "logistic")


# ------------------------------------------------------------------------------ ensemble
def ensemble_mean_var(masks: Tensor) -> Tuple[Tensor, Tensor]:
    """``masks`` (M, ...) → per-voxel mean and population variance over axis 0."""
    if masks.ndim < 1 or masks.shape[0] < 1:
        raise ValueError("need at least one mask")
    m = masks.float()
    mean = m.mean(dim=0)
    var = ((m - mean) ** 2).mean(dim=0)
    return mean, var


def adaptive_threshold(var: Tensor, valid: Optional[Tensor], u_th: float, min_confident: float = 0.0,
                       u_th_max: Optional[float] = None) -> float:
    """The effective u_th (module docstring): ``u_th`` raised so that at least ``min_confident``
    of the valid voxels are confident, capped at ``u_th_max`` (default: no raise above 0.25)."""
    u = float(u_th)
    if min_confident <= 0:
        return u
    v = var[valid.bool()] if valid is not None else var.reshape(-1)
    if v.numel() == 0:
        return u
    frac = float((v < u).float().mean())
    if frac >= min_confident:
        return u
    flat = v.float().reshape(-1)
    k = min(flat.numel(), max(1, math.ceil(float(min_confident) * flat.numel())))
    q = float(torch.kthvalue(flat, k).values)  # the k-th smallest variance, k = ceil(q n)
    cap = 0.25 + 1e-6 if u_th_max is None else float(u_th_max)
    return min(cap, max(u, q + 1e-6))


def variance_mask(var: Tensor, u_th: float, valid: Optional[Tensor] = None) -> Tensor:
    """``M_conf = [Var < u_th] · valid`` as a float 0/1 tensor."""
    conf = var < float(u_th)
    if valid is not None:
        conf = conf & valid.bool()
    return conf.float()


def pseudo_label(mean: Tensor, conf: Tensor) -> Tensor:
    """``Pseudo = mean · M_conf``."""
    return mean * conf


def filter_ensemble(masks: Tensor, u_th: float, valid: Optional[Tensor] = None, min_confident: float = 0.0,
                    u_th_max: Optional[float] = None) -> Dict[str, Tensor]:
    """Algorithm 2's filter in one call: ``{"mean", "var", "conf", "pseudo", "u_th"}``."""
    mean, var = ensemble_mean_var(masks)
    u = adaptive_threshold(var, valid, u_th, min_confident, u_th_max)
    conf = variance_mask(var, u, valid)
    return {"mean": mean, "var": var, "conf": conf, "pseudo": pseudo_label(mean, conf),
            "u_th": torch.tensor(u, dtype=torch.float32)}


# ------------------------------------------------------------------------------ losses
def rs_consistency_loss(p_s: Tensor, p_f: Tensor, conf: Tensor) -> Tensor:
    """``L_rs-con = Σ M_conf (p_s − p_f)² / Σ M_conf`` (0 with a gradient path when Σ M_conf = 0)."""
    w = conf.to(p_s.dtype)
    num = (w * (p_s - p_f.to(p_s.dtype)) ** 2).sum()
    den = w.sum()
    if float(den) <= 0:
        return (p_s * 0.0).sum()
    return num / den


def consistency_loss(p_s: Tensor, p_t: Tensor) -> Tensor:
    """Mean-teacher consistency: ``mean (p_s − p_t)²`` (``p_t`` is detached)."""
    return ((p_s - p_t.detach().to(p_s.dtype)) ** 2).mean()


# ------------------------------------------------------------------------------ ramps
def rampup(x: float, kind: str = "sigmoid") -> float:
    """The ramp-up r(x) for x = t / T_r (module docstring)."""
    if kind == "sigmoid":
        c = min(1.0, max(0.0, float(x)))
        return float(math.exp(-5.0 * (1.0 - c) ** 2))
    if kind == "linear":
        return min(1.0, max(0.0, float(x)))
    if kind == "logistic":
        return float(1.0 / (1.0 + math.exp(-float(x))))
    raise ValueError(f"ramp-up must be one of {', '.join(RAMPUPS)}, got {kind!r}")


def consistency_weight(t: float, lambda_max: float = 1.0, t_r: float = 10.0, kind: str = "sigmoid") -> float:
    """``λ(t) = λ_max · r(t / T_r)`` (``T_r = 0``: λ_max at once)."""
    if t_r <= 0:
        return float(lambda_max)
    return float(lambda_max) * rampup(float(t) / float(t_r), kind)


def pseudo_weight(t: float, beta_max: float = 0.3, t_d: float = 40.0) -> float:
    """``β(t) = β_max · exp(−t / T_d)`` (``T_d = 0``: β_max, no decay)."""
    if t_d <= 0:
        return float(beta_max)
    return float(beta_max) * math.exp(-max(0.0, float(t)) / float(t_d))


def poly_lr(base_lr: float, step: int, total: int, power: float = 0.9) -> float:
    """``lr_0 · (1 − step / total)^power`` (clipped at 0)."""
    if total <= 0:
        return float(base_lr)
    frac = min(1.0, max(0.0, float(step) / float(total)))
    return float(base_lr) * (1.0 - frac) ** float(power)


# ------------------------------------------------------------------------------ EMA
def ema_momentum(m: float, updates_done: int, warm_start: bool = True) -> float:
    """The momentum of the next EMA update, the ``updates_done + 1``-th (module docstring)."""
    if not warm_start:
        return float(m)
    t = int(updates_done) + 1
    return min(float(m), 1.0 - 1.0 / t)


def ema_update(ema_state: Mapping[str, Tensor], student_state: Mapping[str, Tensor], momentum: float = 0.99
               ) -> Dict[str, Tensor]:
    """A new EMA state: ``m·θ' + (1 − m)·θ`` for float tensors, the student's value otherwise."""
    if set(ema_state) != set(student_state):
        raise ValueError("EMA and student states have different keys")
    m = float(momentum)
    out = {}
    for k, t in ema_state.items():
        s = student_state[k]
        if torch.is_floating_point(t):
            out[k] = t * m + s.detach().to(t.dtype) * (1.0 - m)
        else:
            out[k] = s.detach().clone()
    return out


@torch.no_grad()
def ema_update_(ema_tensors: Iterable[Tensor], student_tensors: Iterable[Tensor], momentum: float = 0.99) -> None:
    """In place: the same update on matching tensors (parameters and buffers of two modules)."""
    m = float(momentum)
    for e, s in zip(ema_tensors, student_tensors):
        if torch.is_floating_point(e):
            e.mul_(m).add_(s.detach().to(e.dtype), alpha=1.0 - m)
        else:
            e.copy_(s)


# ------------------------------------------------------------------------------ points
def sample_points_per_slice(mask: Tensor, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    """One uniformly drawn foreground pixel per slice of ``mask`` (D, H, W).

    Returns ``(points (D, 2) float [x = i, y = j], valid (D,) bool)``; empty slices give
    ``(0, 0)`` and ``valid = False``. The draws use ``generator`` in slice order, one number per
    slice (also for empty ones), so the same generator state gives the same points."""
    if mask.ndim != 3:
        raise ValueError(f"expected a mask (D, H, W), got {tuple(mask.shape)}")
    d, h, w = mask.shape
    u = torch.rand(d, generator=generator)
    pts = torch.zeros(d, 2)
    valid = torch.zeros(d, dtype=torch.bool)
    flat = mask.reshape(d, -1).bool().cpu()
    for z in range(d):
        idx = torch.nonzero(flat[z], as_tuple=False).flatten()
        if idx.numel() == 0:
            continue
        pick = int(idx[min(idx.numel() - 1, int(float(u[z]) * idx.numel()))])
        pts[z, 0] = float(pick % w)
        pts[z, 1] = float(pick // w)
        valid[z] = True
    return pts, valid


def sample_point_3d(mask: Tensor, generator: torch.Generator) -> Optional[Tuple[int, int, int]]:
    """One uniformly drawn foreground voxel ``(k, j, i)`` of ``mask`` (D, H, W); None if empty."""
    idx = torch.nonzero(mask.bool().cpu().reshape(-1), as_tuple=False).flatten()
    u = float(torch.rand(1, generator=generator))
    if idx.numel() == 0:
        return None
    d, h, w = mask.shape
    pick = int(idx[min(idx.numel() - 1, int(u * idx.numel()))])
    return pick // (h * w), (pick // w) % h, pick % w
