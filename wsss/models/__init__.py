"""Backbones for the classifier/CAM stage: the registry, the interface and pretrained weights.

``build_backbone(name, pretrained="none", **kwargs)`` builds any registered backbone
(``resnet18``, ``resnet50``, ``resnet101``, their ``_os8`` variants and ``resnet38``);
``BACKBONES.names()`` lists them.
"""

from .backbones import BACKBONES, Backbone, ResNet, build_backbone, list_backbones
from .resnet38 import ResNet38
from .weights import LoadReport, PretrainedWeightsError, load_pretrained, read_state_dict

__all__ = [
    "BACKBONES",
    "Backbone",
    "LoadReport",
    "PretrainedWeightsError",
    "ResNet",
    "ResNet38",
    "build_backbone",
    "list_backbones",
    "load_pretrained",
    "read_state_dict",
]
