"""Multi-tensor launch shared by every kernel: one launch updates a whole list of tensors.

The host builds two small device tables and caches them:

* a *pointer table*, int64 ``[n_tensors, n_arrays]``: the data address of every array (param,
  grad, each state) of every tensor. The kernel turns an address back into a typed pointer with
  ``.to(proto.dtype)``, where ``proto`` is the first tensor of that array (so each array may
  have its own dtype: bf16 params and grads with fp32 state);
* a *block table*, int64 ``[n_blocks, 3]``: for each program, the tensor it works on, where its
  ``BLOCK`` elements start inside that tensor, and that tensor's ``numel``. Empty tensors get
  no block.

Full blocks load and store without a mask (the compiler may vectorize them); only each
tensor's last block is masked, with masked lanes loaded as 0.

The block table depends only on the sizes, the pointer table only on the addresses; each is
rebuilt only when those change (a new grad tensor every step, as after
``zero_grad(set_to_none=True)``, costs one small host-to-device copy of addresses).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch
import triton
import triton.language as tl

#: elements per program; every program handles one block of one tensor
BLOCK = 1024
#: the element dtypes the kernels accept for parameters and gradients
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CACHE_SIZE = 16
_ALIGNMENT_BYTES = 16


class _LRU(OrderedDict):
    """A small least-recently-used cache: tables for a few param groups, never a leak."""

    def get_or_build(self, key, build):
        value = self.get(key)
        if value is None:
            value = build()
            self[key] = value
            if len(self) > _CACHE_SIZE:
                self.popitem(last=False)
        else:
            self.move_to_end(key)
        return value


_BLOCK_TABLES = _LRU()
_POINTER_TABLES = _LRU()


def _to_device(rows: list, device: torch.device) -> torch.Tensor:
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        # Pinned + non_blocking: a pageable copy would make the host wait for the GPU.
        return table.pin_memory().to(device, non_blocking=True)
    return table


def block_table(numels: tuple, device: torch.device) -> torch.Tensor:
    """``[n_blocks, 3]`` rows ``(tensor index, first element of the block, tensor numel)``."""

    def build():
        rows = [
            (index, start, numel)
            for index, numel in enumerate(numels)
            for start in range(0, numel, BLOCK)
        ]
        return _to_device(rows or [(0, 0, 0)], device)[: len(rows)]

    return _BLOCK_TABLES.get_or_build((device, numels), build)


def pointer_table(arrays: list, device: torch.device) -> tuple[torch.Tensor, bool]:
    """``[n_tensors, n_arrays]`` addresses and whether all are 16-byte aligned."""
    addresses = tuple(tuple(t.data_ptr() for t in tensors) for tensors in zip(*arrays))

    def build():
        aligned = all(a % _ALIGNMENT_BYTES == 0 for row in addresses for a in row)
        return _to_device([list(row) for row in addresses], device), aligned

    return _POINTER_TABLES.get_or_build((device, addresses), build)


def check_lists(params, grads, states) -> None:
    """Raise before any launch if the lists cannot be updated element by element."""
    arrays = [params, grads, *states]
    device = params[0].device
    for name, tensors in zip(("params", "grads", "states"), (params, grads, *states)):
        if len(tensors) != len(params):
            raise ValueError(f"{name} has {len(tensors)} tensors, params has {len(params)}")
    for array in arrays:
        if any(t.device != device for t in array):
            raise ValueError(f"all tensors of one launch must be on {device}")
        if any(t.dtype != array[0].dtype for t in array):
            raise ValueError("all tensors of one array (params, grads, a state) share a dtype")
    for tensors in zip(*arrays):
        _check_same_layout(tensors)


def _dense(tensor: torch.Tensor) -> bool:
    """Whether the elements fill ``numel`` consecutive slots of storage, in some dim order."""
    expected = 1
    for size, stride in sorted(zip(tensor.shape, tensor.stride()), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _check_same_layout(tensors) -> None:
    first = tensors[0]
    if all(t.is_contiguous() for t in tensors):
        if any(t.numel() != first.numel() for t in tensors):
            raise ValueError("a parameter, its grad and its state must have the same numel")
        return
    # Channels-last and other dense permuted layouts are fine if every array shares them:
    # the kernel then walks the same storage order in all of them.
    if not all(_dense(t) and t.stride() == first.stride() and t.shape == first.shape
               for t in tensors):
        raise ValueError(
            "the Triton kernels need each parameter, its grad and its state to be dense with "
            "the same strides; got strides " + ", ".join(str(t.stride()) for t in tensors)
        )


def launch(kernel, params, grads, states, scalars: dict, flags: dict, sums=None):
    """Launch ``kernel`` once over every tensor of the lists.

    ``scalars`` are runtime fp32 arguments (changing them never recompiles; those the kernel
    does not take are left out, as each backend takes the rule's scalars by name); ``flags`` are
    ``tl.constexpr`` switches (each value compiles once). ``sums`` is an optional fp32 buffer
    of one element per tensor that the kernel accumulates into. The caller has checked the
    lists (``dampopt.kernels.check_arrays``).
    """
    arrays = [params, grads, *states]
    scalars = {name: value for name, value in scalars.items() if name in kernel.arg_names}
    device = params[0].device
    blocks = block_table(tuple(p.numel() for p in params), device)
    if blocks.shape[0] == 0:
        return
    pointers, aligned = pointer_table(arrays, device)
    protos = [array[0] for array in arrays]
    extra = () if sums is None else (sums,)
    # Triton launches on the current CUDA device: make it the tensors' one (cuda:1 params).
    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        kernel[(blocks.shape[0],)](
            pointers, blocks, *extra, *protos, **scalars, **flags, ALIGNED=aligned, BLOCK=BLOCK
        )


# -- helpers the kernels share ---------------------------------------------------------------


@triton.jit
def locate_block(block_table, BLOCK: tl.constexpr):
    """This program's tensor index, element offsets, mask and whether the block is full."""
    row = block_table + tl.program_id(0) * 3
    tensor = tl.load(row)
    start = tl.multiple_of(tl.load(row + 1), BLOCK)
    numel = tl.load(row + 2)
    offsets = start + tl.arange(0, BLOCK)
    return tensor, offsets, offsets < numel, start + BLOCK <= numel


@triton.jit
def array_pointer(pointer_table, tensor, column: tl.constexpr, n_columns: tl.constexpr, proto,
                  ALIGNED: tl.constexpr):
    """Typed pointer to array ``column`` of tensor ``tensor``; ``proto`` gives the dtype."""
    pointer = tl.load(pointer_table + tensor * n_columns + column).to(proto.dtype)
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def load_fp32(pointer, offsets, mask, FULL: tl.constexpr):
    """Load a block as fp32 (masked lanes read 0, so they add nothing to sums)."""
    if FULL:
        value = tl.load(pointer + offsets)
    else:
        value = tl.load(pointer + offsets, mask=mask, other=0.0)
    return value.to(tl.float32)


@triton.jit
def coupled_gradient(g, q, weight_decay, HAS_WEIGHT_DECAY: tl.constexpr):
    """The gradient with coupled L2 weight decay, ``g + weight_decay * q``."""
    if HAS_WEIGHT_DECAY:
        g = g + weight_decay * q
    return g


@triton.jit
def cubic_damping(p, two_c_h):
    """The exact flow of ``dp/dt = -c p^3`` over a time ``h``: ``p / sqrt(1 + 2 c h p^2)``."""
    return tl.div_rn(p, tl.sqrt_rn(1.0 + (two_c_h * p) * p))


@triton.jit
def round_to_bfloat16(value):
    """fp32 -> bf16 rounding to nearest even, by bits (NaN stays NaN).

    Written out because Triton's interpreter truncates in ``.to(tl.bfloat16)``; on GPU this
    matches the hardware conversion and torch's, so both paths round like the reference.
    """
    bits = value.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    upper = tl.where(value == value, bits >> 16, 0x7FC0)
    return upper.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def store(pointer, offsets, value, mask, FULL: tl.constexpr):
    """Store an fp32 block in the array's dtype (round to nearest even for bf16/fp16)."""
    if pointer.dtype.element_ty == tl.bfloat16:
        value = round_to_bfloat16(value)
    else:
        value = value.to(pointer.dtype.element_ty)
    if FULL:
        tl.store(pointer + offsets, value)
    else:
        tl.store(pointer + offsets, value, mask=mask)
