"""Layer groups: the unit the pipeline localizes and treats (the paper's 7 ResNet-18 groups).

A group is a name and the parameters under it. Names are module paths in ``model``'s own naming
(``"layer3"``, ``"layer1.0"``, ``"encoder.layers.2"``), so a group found on one model can be
looked up again on a copy of it (:func:`resolve_groups`). Wrappers are seen through: DDP,
DataParallel and ``torch.compile`` (:func:`._data.unwrap`) and peft's ``PeftModel`` (names are
the base model's, ``"bert.encoder.layer.0"``, and LoRA parameters sit in their block's group).
"""

from __future__ import annotations

import re
import warnings

import torch
from torch import nn

from .._validation import check_int
from ._data import unwrap


def naming_root(model: nn.Module) -> nn.Module:
    """The module whose names the groups use: ``model`` unwrapped, and a peft model's base.

    peft is not imported: a ``PeftModel`` is recognised by its module and ``get_base_model``.
    """
    model = unwrap(model)
    while type(model).__module__.split(".")[0] == "peft" and hasattr(model, "get_base_model"):
        base = model.get_base_model()
        if base is model or not isinstance(base, nn.Module):
            break
        model = unwrap(base)
    return model


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


def _block_containers(model: nn.Module) -> list[str]:
    """Paths of the outermost repeated block containers: an ``nn.ModuleList`` or
    ``nn.Sequential`` whose children that hold parameters are at least two, all of one type."""
    found = []

    def visit(path, module):
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            holders = [m for m in module.children() if next(m.parameters(), None) is not None]
            if len(holders) >= 2 and len({type(m) for m in holders}) == 1:
                found.append(path)
                return
        for name, child in module.named_children():
            visit(f"{path}.{name}" if path else name, child)

    visit("", model)
    return found


def _auto_group(name: str, containers: list, per_container: bool) -> str:
    """The group of parameter ``name`` under ``containers`` (see :func:`layer_groups`)."""
    *module_path, _ = name.split(".")
    if not module_path:
        return name
    best = 0
    for container in containers:
        parts = container.split(".") if container else []
        if module_path[: len(parts)] == parts:
            if per_container:
                return container
            return ".".join(module_path[: len(parts) + 1])
        shared = 0
        for a, b in zip(parts, module_path):
            if a != b:
                break
            shared += 1
        best = max(best, shared)
    return ".".join(module_path[: best + 1])


def _auto_groups(model: nn.Module, named) -> dict | None:
    containers = _block_containers(model)
    if not containers:
        return None
    parents = [c.rpartition(".")[0] if "." in c else "" for c in containers]
    # several containers side by side (torchvision's layer1..layer4): they are stages, one
    # group each; otherwise (one container, or containers in different places such as an
    # encoder's and a decoder's blocks) one group per block
    per_container = len(containers) > 1 and len(set(parents)) == 1 and "" not in containers
    groups: dict[str, list] = {}
    for name, param in named:
        groups.setdefault(_auto_group(name, containers, per_container), []).append(param)
    return groups


def _warn_if_coarse(groups: dict, how: str) -> None:
    total = sum(p.numel() for ps in groups.values() for p in ps)
    largest = max(groups, key=lambda k: sum(p.numel() for p in groups[k]))
    share = sum(p.numel() for p in groups[largest]) / total if total else 0.0
    if len(groups) < 3 or share > 0.9:
        what = (f"only {len(groups)} group(s)" if len(groups) < 3
                else f"group {largest!r} holds {share:.0%} of the parameters")  # fmt: skip
        fix = ("a larger depth, pattern= or groups=" if "auto" in how else
               "depth='auto' (one group per block of the repeated block container), a larger "
               "depth, pattern= or groups=")  # fmt: skip
        warnings.warn(
            f"layer_groups({how}) gives {what}: too coarse to localize anything; pass {fix}",
            UserWarning,
            stacklevel=3,
        )


def layer_groups(model: nn.Module, depth: int | str = "auto", pattern: str | None = None) -> dict:
    """Ordered ``{group name: [parameters]}``, in the order of ``model.named_parameters()``.

    Args:
        model: any ``nn.Module`` with at least one parameter (DDP, DataParallel, compiled and
            peft wrappers are seen through; the names are the bare/base model's).
        depth: "auto", or how many levels of the module tree name a group.
            "auto": find the outermost repeated block containers (an ``nn.ModuleList`` or
            ``nn.Sequential`` of at least two same-type blocks: HF ``encoder.layer``, GPT-2's
            ``transformer.h``, timm's ``blocks`` / ``stages``, torchvision's ``layerN``). One
            such container: one group per block (``bert.encoder.layer.0``,
            ``transformer.h.3``, ``blocks.7``, ``stages.2``); several side by side under one
            parent (torchvision's resnet): one group per container, i.e. per stage, which is
            the paper's seven ResNet-18 groups. Every other parameter groups by the module
            one level below what it shares with the nearest container (embeddings
            ``transformer.wte``, heads ``lm_head`` / ``classifier``, ``conv1``); without any
            container, "auto" is depth 1.
            1: the top-level children
            (torchvision's resnet18: conv1, bn1, layer1..layer4, fc); 2: one level down
            (residual blocks ``layer1.0``; transformer blocks ``encoder.layers.0``). ModuleList
            and ModuleDict are containers, not levels: their entries count at the container's
            own level. A parameter held by a module shallower than ``depth`` groups under that
            module (``conv1`` at depth 2); one held by the model itself forms its own group.
        pattern: optional regex matched (``re.match``) against each parameter name; a matching
            parameter goes to the group named by the first capture group if the pattern has one,
            else by the whole match. Parameters it does not match are grouped by ``depth``.

    Shared parameters are listed once. Frozen parameters are included (treat decides what
    trains). Warns (UserWarning, naming the fix) when fewer than 3 groups result or one group
    holds more than 90% of the parameters.
    """
    if depth != "auto":
        check_int("depth", depth, 1, hint=' (or depth="auto")')
    _named_parameters(model)
    model = naming_root(model)  # names as the bare module has them, not "module." / "_orig_mod."
    named = list(model.named_parameters())
    regex = None
    if pattern is not None:
        try:
            regex = re.compile(pattern)
        except re.error as error:
            raise ValueError(f"pattern is not a valid regular expression: {error}") from None
    how = f"depth={depth!r}" + (", pattern" if pattern is not None else "")
    by_depth = None
    if depth == "auto":
        by_depth = _auto_groups(model, named)
        depth = 1 if by_depth is None else depth
    owner = {id(p): key for key, ps in (by_depth or {}).items() for p in ps}
    groups: dict[str, list] = {}
    cache: dict[str, bool] = {}
    for name, param in named:
        match = regex.match(name) if regex is not None else None
        if match is not None and (match.group(1) if regex.groups else match.group(0)):
            key = match.group(1) if regex.groups else match.group(0)
        elif by_depth is not None:
            key = owner[id(param)]
        else:
            key = _depth_group(model, name, depth, cache)
        groups.setdefault(key, []).append(param)
    _warn_if_coarse(groups, how)
    return groups


def _params_under(named, prefix: str) -> list:
    return [p for n, p in named if n == prefix or n.startswith(prefix + ".")]


def resolve_groups(model: nn.Module, groups=None, argument: str = "groups") -> dict:
    """Turn the ways a caller can name groups into ``{name: [parameters of model]}``.

    ``groups`` may be None (``layer_groups(model)``), a dict ``{name: [parameters]}`` whose
    parameters must belong to ``model``, or names: each a module path or parameter name of
    ``model`` (``"layer3"``, ``"layer1.0"``, ``"fc.bias"``). Unknown names raise ValueError.
    """
    _named_parameters(model)
    named = list(naming_root(model).named_parameters())
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
    with warnings.catch_warnings():  # the default groups only serve to look names up here
        warnings.simplefilter("ignore", UserWarning)
        known = layer_groups(model)
    resolved = {}
    for key in names:
        if not isinstance(key, str):
            raise TypeError(f"{argument} must hold group names (str), got {type(key).__name__}")
        params = known.get(key) or _params_under(named, key)
        if not params:
            raise ValueError(
                f"unknown group {key!r} in {argument}; the groups of this model are "
                f"{list(known)} (module paths such as 'layer1.0' also work)"
            )
        resolved[key] = params
    return resolved


def parameter_names(model: nn.Module) -> dict:
    """``{id(parameter): name}`` for every (deduplicated) parameter of ``model``."""
    return {id(p): n for n, p in _named_parameters(model)}
