"""Layer groups: the unit the pipeline localizes and treats (the paper's 7 ResNet-18 groups).

A group is a name and the parameters under it. Names are module paths in ``model``'s own naming
(``"layer3"``, ``"layer1.0"``, ``"encoder.layers.2"``), so a group found on one model can be
looked up again on a copy of it (:func:`resolve_groups`).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .._validation import check_int
from ._data import unwrap


def _named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap(model)
    # named_parameters() drops duplicates, so a tied or shared weight is counted once, under the
    # first name it is reached by.
    named = list(model.named_parameters())
    if not named:
        raise ValueError(f"model has no parameters: nothing to diagnose ({type(model).__name__})")
    return named


# Pure containers have no forward of their own: they are not a level of the model. With this,
# depth 2 of ``model.encoder.layers[i]`` (a ModuleList) names transformer blocks
# ``encoder.layers.0``, as depth 2 of torchvision's resnet (Sequentials) names residual blocks.
_TRANSPARENT = (nn.ModuleList, nn.ModuleDict)


def _depth_group(model: nn.Module, name: str, depth: int, cache: dict) -> str:
    *module_path, _ = name.split(".")
    if not module_path:
        return name  # a parameter held by the model itself (e.g. a ViT's cls_token)
    level = 0
    for end in range(1, len(module_path) + 1):
        prefix = ".".join(module_path[:end])
        if prefix not in cache:
            cache[prefix] = isinstance(model.get_submodule(prefix), _TRANSPARENT)
        level += not cache[prefix]
        if level == depth:
            return prefix
    return ".".join(module_path)


def layer_groups(model: nn.Module, depth: int = 1, pattern: str | None = None) -> dict:
    """Ordered ``{group name: [parameters]}``, in the order of ``model.named_parameters()``.

    Args:
        model: any ``nn.Module`` with at least one parameter.
        depth: how many levels of the module tree name a group. 1: the top-level children
            (torchvision's resnet18: conv1, bn1, layer1..layer4, fc); 2: one level down
            (residual blocks ``layer1.0``; transformer blocks ``encoder.layers.0``). ModuleList
            and ModuleDict are containers, not levels: their entries count at the container's
            own level. A parameter held by a module shallower than ``depth`` groups under that
            module (``conv1`` at depth 2); one held by the model itself forms its own group.
        pattern: optional regex matched (``re.match``) against each parameter name; a matching
            parameter goes to the group named by the first capture group if the pattern has one,
            else by the whole match. Parameters it does not match are grouped by ``depth``.

    Shared parameters are listed once. Frozen parameters are included (localize computes their
    gradients anyway; treat decides what trains).
    """
    check_int("depth", depth, 1)
    named = _named_parameters(model)
    model = unwrap(model)  # names as the bare module has them, not "module." / "_orig_mod."
    regex = None
    if pattern is not None:
        try:
            regex = re.compile(pattern)
        except re.error as error:
            raise ValueError(f"pattern is not a valid regular expression: {error}") from None
    groups: dict[str, list] = {}
    cache: dict[str, bool] = {}
    for name, param in named:
        match = regex.match(name) if regex is not None else None
        if match is not None and (match.group(1) if regex.groups else match.group(0)):
            key = match.group(1) if regex.groups else match.group(0)
        else:
            key = _depth_group(model, name, depth, cache)
        groups.setdefault(key, []).append(param)
    return groups


def _params_under(named, prefix: str) -> list:
    return [p for n, p in named if n == prefix or n.startswith(prefix + ".")]


def resolve_groups(model: nn.Module, groups=None, argument: str = "groups") -> dict:
    """Turn the ways a caller can name groups into ``{name: [parameters of model]}``.

    ``groups`` may be None (``layer_groups(model)``), a dict ``{name: [parameters]}`` whose
    parameters must belong to ``model``, or names: each a module path or parameter name of
    ``model`` (``"layer3"``, ``"layer1.0"``, ``"fc.bias"``). Unknown names raise ValueError.
    """
    named = _named_parameters(model)
    if groups is None:
        return layer_groups(model)
    if isinstance(groups, str):
        groups = [groups]
    if isinstance(groups, dict):
        owned = {id(p) for _, p in named}
        resolved = {}
        for key, params in groups.items():
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            if not params:
                raise ValueError(f"{argument}[{key!r}] holds no parameters")
            if any(id(p) not in owned for p in params):
                raise ValueError(
                    f"{argument}[{key!r}] holds a tensor that is not a parameter of model"
                )
            resolved[str(key)] = params
        if not resolved:
            raise ValueError(f"{argument} is empty")
        return resolved
    names = list(groups)
    if not names:
        raise ValueError(f"{argument} is empty: name at least one group")
    known = layer_groups(model)
    resolved = {}
    for key in names:
        if not isinstance(key, str):
            raise TypeError(f"{argument} must hold group names (str), got {type(key).__name__}")
        params = known.get(key) or _params_under(named, key)
        if not params:
            raise ValueError(
                f"unknown group {key!r} in {argument}; depth-1 groups of this model are "
                f"{list(known)} (module paths such as 'layer1.0' also work)"
            )
        resolved[key] = params
    return resolved


def parameter_names(model: nn.Module) -> dict:
    """``{id(parameter): name}`` for every (deduplicated) parameter of ``model``."""
    return {id(p): n for n, p in _named_parameters(model)}
