"""WSSS methods: the interface and registry (:mod:`.base`), one module per method, and the builders
the rest of the package uses.

* :func:`build_method`: a registered method by name (``"<name>+islfsl"`` wraps it with the ISL/FSL
  add-on of :mod:`.islfsl`);
* :func:`list_methods`: every valid name;
* :func:`build_classifier`: the configured method with its backbone (``classifier`` section);
* :func:`required_files`: the model files the configured method's training reads
  (:meth:`.base.Method.required_files`), for the workflow's inputs;
* :func:`needs_saliency`: whether the configured method trains on saliency maps
  (:attr:`.base.Method.needs_saliency`).
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional

from torch import nn

from .base import ISLFSL_SUFFIX, METHODS, Method


def load_builtin_methods() -> None:
    """Import every module of ``wsss.methods`` so their ``@METHODS.register`` decorators run."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def build_method(name: str, num_classes: int, backbone: nn.Module, **options: Any) -> Method:
    """Build the registered method ``name``; unknown names raise KeyError listing valid ones.

    ``"<method>+islfsl"`` builds ``<method>`` wrapped by the ISL/FSL add-on; its options are
    ``options["islfsl"]`` (a mapping), every other option goes to ``<method>``.
    """
    load_builtin_methods()
    if name.endswith(ISLFSL_SUFFIX):
        from .islfsl import build_islfsl

        return build_islfsl(name[: -len(ISLFSL_SUFFIX)], num_classes=num_classes, backbone=backbone, **options)
    return METHODS.build(name, num_classes=num_classes, backbone=backbone, **options)


def list_methods() -> List[str]:
    """Registered names plus ``"<name>+islfsl"`` for each method that supports the add-on."""
    load_builtin_methods()
    from .islfsl import supports_islfsl

    names = METHODS.names()
    return sorted(names + [n + ISLFSL_SUFFIX for n in names if supports_islfsl(METHODS.get(n))])


def build_classifier(cfg: Mapping[str, Any], num_classes: int, pretrained: Optional[str] = None) -> Method:
    """The configured method with its backbone (``pretrained`` overrides the config, e.g. 'none'
    when loading a trained model)."""
    from ..models import build_backbone

    c = cfg["classifier"]
    backbone = build_backbone(c["backbone"], pretrained=pretrained or c["pretrained"], **c["backbone_options"])
    return build_method(c["method"], num_classes=num_classes, backbone=backbone, **c["method_options"])


def required_files(cfg: Mapping[str, Any]) -> List[str]:
    """Model files the classifier training of an experiment reads besides the data (SMAF's teacher,
    another experiment's ``model.pt``; ACR's initialisations): the registered method's
    :meth:`~.base.Method.required_files` of its ``method_options``. The workflow makes them inputs
    of the training job, so the DAG trains them first.

    ``cfg``: the experiment's merged config or its ``classifier`` section. ``"<method>+islfsl"``
    asks ``<method>`` with the options that go to it (all but ``islfsl``).
    """
    c = cfg["classifier"] if "classifier" in cfg else cfg
    name = c.get("method")
    if not name:
        return []
    options = dict(c.get("method_options") or {})
    if name.endswith(ISLFSL_SUFFIX):
        name = name[: -len(ISLFSL_SUFFIX)]
        options.pop("islfsl", None)
    load_builtin_methods()
    return [str(p) for p in METHODS.get(name).required_files(options)]


def needs_saliency(cfg: Mapping[str, Any]) -> bool:
    """Whether the classifier training of an experiment reads saliency maps
    (:attr:`~.base.Method.needs_saliency` of the registered method; ``"<method>+islfsl"`` asks
    ``<method>``). ``cfg``: the experiment's merged config or its ``classifier`` section."""
    c = cfg["classifier"] if "classifier" in cfg else cfg
    name = c.get("method")
    if not name:
        return False
    if name.endswith(ISLFSL_SUFFIX):
        name = name[: -len(ISLFSL_SUFFIX)]
    load_builtin_methods()
    return bool(getattr(METHODS.get(name), "needs_saliency", False))
