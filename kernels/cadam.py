"""CADAM in one pass: read q, g, p, zeta once, write q, p, zeta once.

Mirrors :func:`dampopt.cadam.cadam_step` line by line (B, C, A, D, E).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._multi_tensor import (
    array_pointer,
    coupled_gradient,
    cubic_damping,
    load_fp32,
    locate_block,
    store,
)


@triton.jit
def _cadam_block(q_ptr, g_ptr, p_ptr, zeta_ptr, offsets, mask, h, weight_decay, moment_decay,
                 moment_gain, eps, two_c_h, momentum_decay, HAS_WEIGHT_DECAY: tl.constexpr,
                 FULL: tl.constexpr):
    q = load_fp32(q_ptr, offsets, mask, FULL)
    g = load_fp32(g_ptr, offsets, mask, FULL)
    p = load_fp32(p_ptr, offsets, mask, FULL)
    zeta = load_fp32(zeta_ptr, offsets, mask, FULL)
    g = coupled_gradient(g, q, weight_decay, HAS_WEIGHT_DECAY)
    p = p - h * g  # B: p = p - h g
    zeta = zeta * moment_decay + moment_gain * (g * g)  # C: second moment
    q = q + h * tl.div_rn(p, tl.sqrt_rn(zeta) + eps)  # A: q = q + h p / (sqrt(zeta) + eps)
    p = cubic_damping(p, two_c_h)  # D: cubic damping, exact flow
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
