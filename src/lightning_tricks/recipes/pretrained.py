"""Pretrained weights from a local file (never a download), with errors that name the keys that do not fit.

The file is a ``state_dict`` saved with ``torch.save(model.state_dict(), path)``, or a Lightning checkpoint of
this recipe (its ``state_dict`` with the ``net.`` prefix); it is read with ``torch.load(weights_only=True)``.
A classifier whose shape differs from the file's (another number of classes) keeps its fresh initialisation,
and a message says so; any other missing, unexpected or differently shaped key is an error naming the keys.

Example::

    from lightning_tricks.recipes.pretrained import load_pretrained

    torch.save(trained_net.state_dict(), "resnet20.pt")
    load_pretrained(create_model("resnet20", num_classes=100), "resnet20.pt")  # new 100-class head
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_tricks.recipes.models.layers import get_classifier

#: Keys listed in an error message before "and N more".
SHOWN_KEYS = 8


def _listed(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    return ", ".join(keys[:SHOWN_KEYS]) + more


def read_state_dict(path: str | Path, key: str = "pretrained") -> dict[str, torch.Tensor]:
    """Tensors of a ``state_dict`` file or of a Lightning checkpoint of the recipe (``net.`` prefix removed).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file holds no ``state_dict``.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"{key}={str(path)!r} is not a file; set {key} to a weights file saved with "
            "torch.save(model.state_dict(), path) (weights are never downloaded), or null for random init "
            "(also when testing or resuming from a checkpoint: the checkpoint holds the weights)"
        )
    state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a Lightning checkpoint
        if any(k.startswith("net.") for k in state):  # the recipe's network, without its metric states
            state = {k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{key}={str(path)!r} holds no state_dict (a dict of parameter name -> tensor)")
    return state


def head_keys(net: nn.Module) -> set[str]:
    """``state_dict`` keys of the classifier layer of ``net`` (:func:`get_classifier`)."""
    head = get_classifier(net)
    prefix = next(name for name, module in net.named_modules() if module is head)
    return {f"{prefix}.{name}" if prefix else name for name in head.state_dict()}


def check_fits(
    target: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str, model: str, skip: set[str]
) -> None:
    """Raise ``ValueError`` naming the keys of ``state`` that do not fit ``target`` (``skip``: left out).

    Example::

        check_fits(net.state_dict(), torch.load(path, weights_only=True), "weights.pt", "ResNet", set())
    """
    missing = sorted(set(target) - set(state) - skip)
    unexpected = sorted(set(state) - set(target))
    shapes = sorted(
        f"{k} (file {tuple(state[k].shape)}, model {tuple(target[k].shape)})"
        for k in set(state) & set(target)
        if state[k].shape != target[k].shape
    )
    problems = [
        f"{label}: {_listed(keys)}"
        for label, keys in (
            ("missing from the file", missing),
            ("not in the model", unexpected),
            ("shape", shapes),
        )
        if keys
    ]
    if problems:
        raise ValueError(
            f"{source} does not fit {model}: " + "; ".join(problems) + ". Check that the file was saved "
            "from the same architecture (model name and model_kwargs) as this model"
        )


def load_pretrained(net: nn.Module, path: str | Path, key: str = "pretrained") -> list[str]:
    """Load the weights in ``path`` into ``net``; return the head keys left freshly initialised.

    Args:
        net: the network, built with the target number of classes and channels.
        path: local weights file (see the module docstring).
        key: the config key named in messages (e.g. ``model.init_args.pretrained``).

    Raises:
        FileNotFoundError: missing file.
        ValueError: keys missing from the file, keys the network does not have, or shapes that differ outside
            the classifier; the message names them.
    """
    state = read_state_dict(path, key)
    target = net.state_dict()
    head = head_keys(net) if any(isinstance(m, nn.Linear) for m in net.modules()) else set()
    reinit = sorted(k for k in head if k in state and state[k].shape != target[k].shape)
    state = {k: v for k, v in state.items() if k not in reinit}
    check_fits(target, state, f"{key}={str(path)!r}", type(net).__name__, skip=set(reinit))
    net.load_state_dict(state, strict=not reinit)
    if reinit:
        rank_zero_warn(
            f"{key}={str(path)!r}: the classifier's shape differs from the file's "
            f"({_listed([f'{k} {tuple(target[k].shape)}' for k in reinit])}); it keeps its fresh "
            "initialisation (re-initialised) and the rest of the network is loaded"
        )
    return reinit
