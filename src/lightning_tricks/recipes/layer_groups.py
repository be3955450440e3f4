"""Layer groups of a network, from the input (id 0) to the classifier (the highest id).

Used by discriminative learning rates (``optimizer.layer_decay``: ``lr * decay**depth``, ``depth`` counted
from the head) and by gradual unfreezing (stage names).

* timm models (they have ``group_matcher``): timm's own fine grouping,
  ``timm.models.group_parameters(model, model.group_matcher(coarse=False), reverse=True)``, the same layers
  as ``timm.optim.param_groups_layer_decay``; parameters it does not match count as the head, as in timm.
* every other model: each top-level child module that owns parameters is one layer, in registration order
  (ResNet: ``conv1``, ``bn1``, ``layer1`` ... ``layer4``, ``fc``); parameters registered on the network itself
  belong to the first layer. Hand-written because only timm models carry a ``group_matcher``.

Example::

    from lightning_tricks.recipes.layer_groups import layer_depths

    depths = layer_depths(create_model("resnet20", num_classes=10))
    depths["classifier.weight"], depths["stem.0.weight"]  # 0, 4
"""

from __future__ import annotations

from torch import nn

from lightning_tricks._extras import import_optional


def layer_ids(net: nn.Module) -> dict[str, int]:
    """``parameter name -> layer id`` of each parameter of ``net``: 0 at the input, the most at the head."""
    names = [name for name, _ in net.named_parameters()]
    if hasattr(net, "group_matcher"):
        timm_models = import_optional("timm.models", "layer groups of a timm model")
        found = timm_models.group_parameters(net, net.group_matcher(coarse=False), reverse=True)
        top = max(found.values(), default=0)
        return {name: found.get(name, top) for name in names}
    owners = [child for child, module in net.named_children() if any(True for _ in module.parameters())]
    index = {child: i for i, child in enumerate(owners)}
    return {name: index.get(name.split(".", 1)[0], 0) for name in names}


def layer_depths(net: nn.Module) -> dict[str, int]:
    """``parameter name -> depth from the head``: 0 for the classifier layer, 1 for the layer before it..."""
    ids = layer_ids(net)
    top = max(ids.values(), default=0)
    return {name: top - layer for name, layer in ids.items()}


def stage_names(net: nn.Module) -> list[str]:
    """Names of the top-level child modules that own parameters, input first (gradual unfreezing's stages)."""
    return [name for name, module in net.named_children() if any(True for _ in module.parameters())]
