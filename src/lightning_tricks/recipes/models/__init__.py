"""Model zoo: every architecture is built by name through :func:`create_model`.

Importing this package registers every family: ``linear``, ``mlp``, ``small_cnn``, the CIFAR
ResNets ``resnet20/32/44/56/110``, ``preact_resnet18``, ``wide_resnet``/``wrn_28_10``/``wrn_16_8``
the torchvision ``resnet18/34/50`` and ``mobilenet_v3_small``, and ``airbench`` (patch-whitening
first layer, see :mod:`~lightning_tricks.recipes.models.airbench`), ``linear_probe`` (a linear classifier on
several stages of a frozen zoo network) and, with timm installed, ``timm/<name>``.

Example::

    from lightning_tricks.recipes.models import create_model, get_classifier

    net = create_model("resnet20", num_classes=10, norm="group", drop_connect=0.5)
    get_classifier(net).out_features  # 10
"""

from lightning_tricks.recipes.models import (  # noqa: F401  (imported to register the models)
    airbench,
    cifar_resnet,
    cnn,
    mlp,
    preact_resnet,
    probe,
    torchvision_models,
    wide_resnet,
)
from lightning_tricks.recipes.models.layers import (
    DropConnectConv2d,
    DropConnectLinear,
    apply_drop_connect,
    get_classifier,
    make_norm,
)
from lightning_tricks.recipes.models.registry import (
    create_model,
    get_model_entry,
    list_models,
    register_model,
    register_variant,
)

__all__ = [
    "DropConnectConv2d",
    "DropConnectLinear",
    "apply_drop_connect",
    "create_model",
    "get_classifier",
    "get_model_entry",
    "list_models",
    "make_norm",
    "register_model",
    "register_variant",
]
