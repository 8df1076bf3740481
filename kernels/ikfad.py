"""iKFAD in one pass: read q, g, p, xi once, write q, p, xi once, and sum the new xi.

Mirrors :func:`dampopt.ikfad.ikfad_step` line by line (sub-steps B, A, C, D in that order,
fp32 math, the same host-side scalars; ``exp2`` with log2(e) folded into the scalar).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._multi_tensor import array_pointer, coupled_gradient, load_fp32, locate_block, store


@triton.jit
def _ikfad_block(q_ptr, g_ptr, p_ptr, xi_ptr, offsets, mask, h, weight_decay, neg_half_h_log2e,
                 friction_decay, friction_gain, momentum_decay,
                 HAS_WEIGHT_DECAY: tl.constexpr, FULL: tl.constexpr):
    q = load_fp32(q_ptr, offsets, mask, FULL)
    g = load_fp32(g_ptr, offsets, mask, FULL)
    p = load_fp32(p_ptr, offsets, mask, FULL)
    xi = load_fp32(xi_ptr, offsets, mask, FULL)
    g = coupled_gradient(g, q, weight_decay, HAS_WEIGHT_DECAY)
    p = p - h * g  # B: p = p - h g
    q = q + h * p  # A: q = q + h p
    p = p * tl.exp2(xi * neg_half_h_log2e)  # C: half kick of friction
    xi = xi * friction_decay + friction_gain * (p * p)
    p = p * tl.exp2(xi * neg_half_h_log2e)  #    second half kick with the new xi
    p = p * momentum_decay  # D: linear friction
    store(q_ptr, offsets, q, mask, FULL)
    store(p_ptr, offsets, p, mask, FULL)
    store(xi_ptr, offsets, xi, mask, FULL)
    return tl.sum(xi, axis=0)  # masked lanes hold xi = 0


@triton.jit
def ikfad_kernel(pointers, blocks, sums, param, grad, momentum, friction, h, weight_decay,
                 neg_half_h_log2e, friction_decay, friction_gain, momentum_decay,
                 HAS_WEIGHT_DECAY: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    tensor, offsets, mask, full = locate_block(blocks, BLOCK)
    q_ptr = array_pointer(pointers, tensor, 0, 4, param, ALIGNED)
    g_ptr = array_pointer(pointers, tensor, 1, 4, grad, ALIGNED)
    p_ptr = array_pointer(pointers, tensor, 2, 4, momentum, ALIGNED)
    xi_ptr = array_pointer(pointers, tensor, 3, 4, friction, ALIGNED)
    if full:
        total = _ikfad_block(q_ptr, g_ptr, p_ptr, xi_ptr, offsets, mask, h, weight_decay,
                             neg_half_h_log2e, friction_decay, friction_gain, momentum_decay,
                             HAS_WEIGHT_DECAY, True)
    else:
        total = _ikfad_block(q_ptr, g_ptr, p_ptr, xi_ptr, offsets, mask, h, weight_decay,
                             neg_half_h_log2e, friction_decay, friction_gain, momentum_decay,
                             HAS_WEIGHT_DECAY, False)
    tl.atomic_add(sums + tensor, total)
