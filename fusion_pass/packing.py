"""Part of the run stage: lay parameters out consecutively in one buffer, in place.

A `linear_group` (``patterns/shared_input_linear.py``) runs as one GEMM only when its weights
(and biases) are consecutive row blocks of one tensor (``fusion_pass.ops.linear_group``).
``pack_parameters`` makes them so without a second copy of the weights: it allocates one buffer
per group and re-points each ``nn.Parameter``'s ``.data`` to its rows of it. The parameters
keep their identity, names, ``requires_grad`` and values, so ``state_dict()`` has the same keys
and values, ``load_state_dict`` copies into the views in place (and the next call sees it), and
optimizers keep their references.

Anything that gives a parameter new storage (``.to()``, ``.half()``, ``load_state_dict(...,
assign=True)``, ``deepcopy``) breaks the layout; the op notices on its next call (a pointer
check per tensor) and runs the separate Linears: exact, only slower. Caveat: the parameters of
a group now share one storage, which ``safetensors.torch.save_file`` refuses ("Some tensors
share memory"); ``torch.save`` stores the buffer once. Save before ``optimize()``, or clone the
state dict's values.

Peak memory: a device buffer allocated while the old parameters still live would raise the peak
by the group's size (604 MB for Hunyuan3D-2's modulation Linears in fp16, above eager's peak).
So on an accelerator the group is staged through host memory: copied to the CPU, the device
storage released, the buffer allocated, the values copied back. Nothing else may hold the old
storage for it to be released (the bench's deepcopy does not).
"""
from __future__ import annotations

import math

import torch
from torch import nn


def pack_parameters(module: nn.Module, paths: tuple[str, ...]) -> bool:
    """Lay the parameters of ``module`` named ``paths`` out consecutively (along dim 0) in one new
    buffer, in that order. Returns False, changing nothing, when they are not distinct plain
    parameters of one dtype, device and trailing shape; True when laid out (or already so)."""
    params = [module.get_parameter(path) for path in paths]
    first = params[0]
    if (len({id(p) for p in params}) != len(params) or first.dim() == 0
            or any(type(p) is not nn.Parameter or p.dtype != first.dtype or p.device != first.device
                   or p.shape[1:] != first.shape[1:] for p in params)):
        return False
    if first.device.type == "meta":
        return False  # no values to lay out (a model built on the meta device only gets inspected)
    from fusion_pass.ops.linear_group import packed_rows

    if packed_rows([p.data for p in params]) is not None:
        return True
    rows = sum(p.shape[0] for p in params)
    shape = (rows, *first.shape[1:])
    with torch.no_grad():
        if first.device.type == "cpu":
            buffer = torch.empty(shape, dtype=first.dtype, device=first.device)
            _point_into(buffer, params, [p.data for p in params])
            return True
        staged = [p.data.to("cpu") for p in params]
        empty = torch.empty((0, *first.shape[1:]), dtype=first.dtype, device=first.device)
        for p in params:
            p.data = empty  # releases the device storage (unless something else holds it)
        try:
            buffer = torch.empty(shape, dtype=first.dtype, device=first.device)
        except BaseException:
            for p, value in zip(params, staged):
                p.data = value.to(first.device)
            raise
        _point_into(buffer, params, staged)
    return True


def _point_into(buffer: torch.Tensor, params: list[nn.Parameter], values: list[torch.Tensor]) -> None:
    """Copy ``values`` into consecutive row blocks of ``buffer`` and make them the parameters' data."""
    start = 0
    for p, value in zip(params, values):
        rows = value.shape[0]
        view = buffer[start:start + rows]
        view.copy_(value)
        p.data = view
        start += rows
    assert start == buffer.shape[0] and math.prod(buffer.shape) == sum(v.numel() for v in values)
