"""Model registry: build any model of the zoo by name.

Example::

    from lightning_tricks.recipes.models import create_model, list_models

    print(list_models())
    net = create_model("resnet20", num_classes=10, in_channels=3)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from lightning_tricks.recipes.models.layers import apply_drop_connect
from lightning_tricks.recipes.models.timm_models import create_timm_model, is_timm_name

ModelFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    """A registered model factory and the square input sizes it is built for."""

    name: str
    factory: ModelFactory
    input_sizes: tuple[int, ...]


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, input_sizes: tuple[int, ...] = (32,)) -> Callable[[ModelFactory], ModelFactory]:
    """Register ``factory(num_classes, in_channels, **kwargs) -> nn.Module`` under ``name``.

    ``input_sizes`` lists the square image sizes the architecture is meant for (tests build each
    model at each of them). Registering a name twice is an error, not a silent overwrite.
    """

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is already registered by {_REGISTRY[name].factory!r}")
        _REGISTRY[name] = ModelEntry(name, factory, tuple(input_sizes))
        return factory

    return decorator


def register_variant(
    name: str,
    builder: ModelFactory,
    *,
    input_sizes: tuple[int, ...] = (32,),
    doc: str | None = None,
    **fixed: Any,
) -> ModelFactory:
    """Register ``builder`` under ``name`` with the arguments in ``fixed`` set, and return the factory.

    The factory's signature is ``builder``'s without the fixed arguments, so :func:`create_model`
    rejects them, and any other unknown argument, by name, as it does for a hand-written factory.

    Args:
        name: registry name, also the factory's ``__name__``.
        builder: model class or function taking ``num_classes``, ``in_channels`` and ``fixed``.
        input_sizes: square image sizes the architecture is meant for (see :func:`register_model`).
        doc: the factory's docstring; ``builder``'s when ``None``.
        **fixed: arguments of ``builder`` that this variant sets, e.g. ``depth=20``.

    Example::

        resnet20 = register_variant("resnet20", CifarResNet, depth=20)
        resnet20(num_classes=10, shortcut="B")
    """
    signature = inspect.signature(builder)
    unknown = sorted(set(fixed) - set(signature.parameters))
    if unknown:
        raise TypeError(f"{builder.__qualname__} has no argument(s) {unknown} to fix for {name!r}")
    signature = signature.replace(
        parameters=[p for key, p in signature.parameters.items() if key not in fixed],
        return_annotation=builder.__name__ if inspect.isclass(builder) else signature.return_annotation,
    )

    def factory(*args: Any, **kwargs: Any) -> nn.Module:
        return builder(**fixed, **signature.bind(*args, **kwargs).arguments)

    factory.__name__ = factory.__qualname__ = name
    factory.__module__ = builder.__module__
    factory.__doc__ = builder.__doc__ if doc is None else doc
    factory.__signature__ = signature  # type: ignore[attr-defined]
    return register_model(name, input_sizes)(factory)


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def get_model_entry(name: str) -> ModelEntry:
    """Look up a registered model; an unknown name raises ``ValueError`` listing the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; valid names: {', '.join(list_models())}, or timm/<name> "
            "for a timm architecture (timm installed)"
        ) from None


def create_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    drop_connect_layers: str | list[str] | None = None,
    **kwargs,
) -> nn.Module:
    """Build the model registered as ``name``.

    Keyword arguments the factory does not accept raise ``TypeError`` naming the model and the
    arguments it does accept, so a typo in YAML fails at start-up with a useful message.

    ``timm/<name>`` builds a timm architecture (:mod:`~lightning_tricks.recipes.models.timm_models`).

    ``drop_connect_layers`` (``"all"`` or module names) puts DropConnect with rate ``drop_connect`` on
    those linear/conv layers instead of the classifier alone
    (:func:`~lightning_tricks.recipes.models.layers.apply_drop_connect`).

    Example::

        create_model("resnet20", num_classes=10, drop_connect=0.1, drop_connect_layers=["layer3"])
    """
    if drop_connect_layers is not None:
        rate = kwargs.pop("drop_connect", 0.0)
        net = create_model(name, num_classes, in_channels, **kwargs)
        apply_drop_connect(net, rate, drop_connect_layers)
        return net
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if is_timm_name(name):
        return create_timm_model(name, num_classes=num_classes, in_channels=in_channels, **kwargs)
    entry = get_model_entry(name)
    params = inspect.signature(entry.factory).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(k for k in kwargs if k not in params)
    if unknown and not accepts_any:
        valid = sorted(k for k in params if k not in ("num_classes", "in_channels"))
        raise TypeError(
            f"model {name!r} got unknown argument(s) {unknown}; it accepts: {', '.join(valid) or 'none'}"
        )
    return entry.factory(num_classes=num_classes, in_channels=in_channels, **kwargs)
