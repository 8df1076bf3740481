"""CubicDampedSGD in one pass: read q, g, p once, write q, p once.

Mirrors :func:`dampopt.cubic_damped_sgd.cubic_damped_step` line by line (B, A, C, D).
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
def _cubic_damped_block(q_ptr, g_ptr, p_ptr, offsets, mask, h, weight_decay, two_c_h,
                        momentum_decay, HAS_WEIGHT_DECAY: tl.constexpr, FULL: tl.constexpr):
    q = load_fp32(q_ptr, offsets, mask, FULL)
    g = load_fp32(g_ptr, offsets, mask, FULL)
    p = load_fp32(p_ptr, offsets, mask, FULL)
    g = coupled_gradient(g, q, weight_decay, HAS_WEIGHT_DECAY)
    p = p - h * g  # B: p = p - h g
    q = q + h * p  # A: q = q + h p
    p = cubic_damping(p, two_c_h)  # C: cubic damping, exact flow
    p = p * momentum_decay  # D: linear friction
    store(q_ptr, offsets, q, mask, FULL)
    store(p_ptr, offsets, p, mask, FULL)


@triton.jit
def cubic_damped_kernel(pointers, blocks, param, grad, momentum, h, weight_decay, two_c_h,
                        momentum_decay, HAS_WEIGHT_DECAY: tl.constexpr, ALIGNED: tl.constexpr,
                        BLOCK: tl.constexpr):
    tensor, offsets, mask, full = locate_block(blocks, BLOCK)
    q_ptr = array_pointer(pointers, tensor, 0, 3, param, ALIGNED)
    g_ptr = array_pointer(pointers, tensor, 1, 3, grad, ALIGNED)
    p_ptr = array_pointer(pointers, tensor, 2, 3, momentum, ALIGNED)
    if full:
        _cubic_damped_block(q_ptr, g_ptr, p_ptr, offsets, mask, h, weight_decay, two_c_h,
                            momentum_decay, HAS_WEIGHT_DECAY, True)
    else:
        _cubic_damped_block(q_ptr, g_ptr, p_ptr, offsets, mask, h, weight_decay, two_c_h,
                            momentum_decay, HAS_WEIGHT_DECAY, False)
