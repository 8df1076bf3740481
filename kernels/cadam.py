"""CADAM in one pass: read q, g, p, zeta once, write q, p, zeta once.

Mirrors :func:`dampopt.cadam.cadam_update` line by line (B, C, A, D, E).
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from dampopt._friction import relaxation_weight

from ._multi_tensor import array_pointer, launch, load_fp32, locate_block, store


@triton.jit
def _cadam_block(q_ptr, g_ptr, p_ptr, zeta_ptr, offsets, mask, h, weight_decay, moment_decay,
                 moment_gain, eps, two_c_h, momentum_decay, HAS_WEIGHT_DECAY: tl.constexpr,
                 FULL: tl.constexpr):
    q = load_fp32(q_ptr, offsets, mask, FULL)
    g = load_fp32(g_ptr, offsets, mask, FULL)
    p = load_fp32(p_ptr, offsets, mask, FULL)
    zeta = load_fp32(zeta_ptr, offsets, mask, FULL)
    if HAS_WEIGHT_DECAY:
        g = g + weight_decay * q
    p = p - h * g  # B: p = p - h g
    zeta = zeta * moment_decay + moment_gain * (g * g)  # C: second moment
    q = q + h * tl.div_rn(p, tl.sqrt_rn(zeta) + eps)  # A: q = q + h p / (sqrt(zeta) + eps)
    p = tl.div_rn(p, tl.sqrt_rn(1.0 + (two_c_h * p) * p))  # D: cubic damping, exact flow
    p = p * momentum_decay  # E: linear friction
    store(q_ptr, offsets, q, mask, FULL)
    store(p_ptr, offsets, p, mask, FULL)
    store(zeta_ptr, offsets, zeta, mask, FULL)


@triton.jit
def cadam_kernel(pointers, blocks, param, grad, momentum, second_moment, h, weight_decay,
                 moment_decay, moment_gain, eps, two_c_h, momentum_decay,
                 HAS_WEIGHT_DECAY: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    tensor, offsets, mask, full = locate_block(blocks, BLOCK)
    q_ptr = array_pointer(pointers, tensor, 0, 4, param, ALIGNED)
    g_ptr = array_pointer(pointers, tensor, 1, 4, grad, ALIGNED)
    p_ptr = array_pointer(pointers, tensor, 2, 4, momentum, ALIGNED)
    zeta_ptr = array_pointer(pointers, tensor, 3, 4, second_moment, ALIGNED)
    if full:
        _cadam_block(q_ptr, g_ptr, p_ptr, zeta_ptr, offsets, mask, h, weight_decay,
                     moment_decay, moment_gain, eps, two_c_h, momentum_decay,
                     HAS_WEIGHT_DECAY, True)
    else:
        _cadam_block(q_ptr, g_ptr, p_ptr, zeta_ptr, offsets, mask, h, weight_decay,
                     moment_decay, moment_gain, eps, two_c_h, momentum_decay,
                     HAS_WEIGHT_DECAY, False)


def cadam_launch(params, grads, states, *, lr, gamma, c, alpha, eps, weight_decay=0.0):
    """One CADAM step over lists of tensors in one launch."""
    momenta, second_moments = states
    h = math.sqrt(lr)
    scalars = dict(
        h=h,
        weight_decay=weight_decay,
        moment_decay=math.exp(-alpha * h),
        moment_gain=relaxation_weight(alpha, h),
        eps=eps,
        two_c_h=2 * c * h,
        momentum_decay=math.exp(-gamma * h),
    )
    flags = dict(HAS_WEIGHT_DECAY=bool(weight_decay))
    launch(cadam_kernel, params, grads, [momenta, second_moments], scalars, flags)
