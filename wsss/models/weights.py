"""Pretrained weights for the backbones: ``load_pretrained(module, spec, arch)``.

``spec`` is one of

* ``"none"``: keep the random initialisation (tests, CPU smoke runs);
* ``"imagenet"``: torchvision's ``IMAGENET1K_V1`` weights for ``resnet18/50/101`` (and their
  ``_os8`` variants). IRN downloads ``resnet50-19c8e357.pth``, the file torchvision served before
  its multi-weight API; the ``IMAGENET1K_V1`` enum now points at ``resnet50-0676ba61.pth``, a
  different file with the same reported accuracy (76.130 / 92.862), which is the closest
  torchvision offers. ``"imagenet_v2"`` selects ``IMAGENET1K_V2`` (resnet50/101 only;
  ``resnet101-cd907fc2.pth``, the file the KTSE/BECO DeepLab stage uses). Downloads go through
  torch's hub cache (``torch.hub.get_dir()``/checkpoints). ResNet-38 has no downloadable
  weights: its ImageNet weights are converted from the MXNet file (``docs/resnet38_weights.md``)
  and given as a path;
* ``"procedural"``: the formula-driven pretraining of the workflow's ``pretrain`` stage
  (:mod:`wsss.pretrain`; docs/pretrain.md), the file :func:`wsss.pretrain.weights_path` names (an
  ``_os8`` backbone loads its base network's file). The workflow makes it before any job that
  reads it; outside the workflow a missing file raises, saying how to make it;
* a path to a file written by ``torch.save``: a raw state_dict, or a dict holding one under
  ``"state_dict"`` or ``"model"``. ``module.`` prefixes (DataParallel) are stripped; if no key
  matches, a ``backbone.`` prefix is stripped too. Classifier keys (``fc.*``) are ignored. Keys
  are loaded with ``strict=False``, but a file whose keys match none of the backbone's raises, and
  the counts of missing and unexpected keys are logged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from ..pretrain import PROCEDURAL_SPEC, base_arch, weights_path

logger = logging.getLogger(__name__)

RESNET38_DOC = "docs/resnet38_weights.md"

#: Backbones with downloadable ImageNet weights -> their weights enum in ``torchvision.models``.
TORCHVISION_WEIGHTS = {
    "resnet18": "ResNet18_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
}
#: ImageNet names a ``pretrained`` spec may give -> the torchvision weights tag.
IMAGENET_SPECS = {"imagenet": "IMAGENET1K_V1", "imagenet_v2": "IMAGENET1K_V2"}
_HEAD_PREFIXES = ("fc.",)
_IGNORED_MISSING_SUFFIX = "num_batches_tracked"


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be obtained or do not fit the backbone; the message says why."""


@dataclasses.dataclass
class LoadReport:
    """What :func:`load_pretrained` did: tensors loaded and keys missing from / unused in the file."""

    source: str
    loaded: int
    missing: List[str]
    unexpected: List[str]


def load_pretrained(module: nn.Module, spec: Union[str, os.PathLike, None], arch: str) -> Optional[LoadReport]:
    """Load the weights named by ``spec`` into ``module`` (a backbone registered as ``arch``).

    Returns ``None`` for ``"none"``, else a :class:`LoadReport`. Raises
    :class:`PretrainedWeightsError` (a ``RuntimeError``) when weights cannot be downloaded or read
    or match no backbone key, and ``FileNotFoundError`` when a path does not exist.
    """
    if spec is None or spec == "none":
        return None
    if isinstance(spec, str) and spec in IMAGENET_SPECS:
        state, source = _torchvision_imagenet(arch, IMAGENET_SPECS[spec])
    elif spec == PROCEDURAL_SPEC:
        path = weights_path(arch)
        if not path.is_file():
            raise FileNotFoundError(
                f"the formula-driven weights of {arch!r} (pretrained: procedural) are not there: {path}; "
                f"the workflow makes them (snakemake --cores all {path})"
            )
        state, source = read_state_dict(path), f"procedural {path}"
    else:
        path = Path(spec).expanduser()
        state, source = read_state_dict(path), str(path)
    return load_state_dict_into(module, state, source=source, arch=arch)


def _torchvision_imagenet(arch: str, tag: str) -> "tuple[Dict[str, torch.Tensor], str]":
    base = base_arch(arch)
    if base == "resnet38":
        raise PretrainedWeightsError(
            "ResNet-38 ImageNet weights cannot be downloaded: they exist only as the MXNet file "
            "ilsvrc-cls_rna-a1_cls1000_ep-0001.params. Convert it to a PyTorch state_dict as described "
            f"in {RESNET38_DOC} and set `pretrained` to the path of the converted .pth file."
        )
    if base not in TORCHVISION_WEIGHTS:
        known = ", ".join(sorted(TORCHVISION_WEIGHTS))
        raise PretrainedWeightsError(
            f"no ImageNet weights known for backbone {arch!r} (torchvision weights exist for {known}); "
            "give the path of a state_dict file as `pretrained` instead"
        )
    import torchvision.models

    enum_cls = getattr(torchvision.models, TORCHVISION_WEIGHTS[base])
    try:
        weights = enum_cls[tag]
    except KeyError:
        have = ", ".join(w.name for w in enum_cls)
        raise PretrainedWeightsError(f"torchvision has no {tag} weights for {base} (it has: {have})") from None
    name = f"{enum_cls.__name__}.{tag}"
    try:
        state = weights.get_state_dict(progress=True)
    except OSError as err:  # urllib's URLError/HTTPError and connection errors are OSErrors
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise PretrainedWeightsError(
            f"could not download the ImageNet weights {name} for {arch!r} from {weights.url}: {err}. "
            f"torch caches downloaded weights in {cache}; on a machine without internet access, copy "
            f"{os.path.basename(weights.url)} there, or set `pretrained` to the path of a local "
            "state_dict file instead."
        ) from err
    return state, f"torchvision {name}"


def read_state_dict(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """Read a state_dict from ``path`` (``torch.load(weights_only=True)``, on the CPU).

    Accepts a raw state_dict or a dict with ``"state_dict"``/``"model"``; strips ``module.``
    prefixes. Errors name the file.
    """
    path = Path(path)
    if not path.is_file():
        valid = ", ".join(repr(s) for s in ["none", *IMAGENET_SPECS])
        raise FileNotFoundError(
            f"pretrained weights file {str(path)!r} does not exist "
            f"(`pretrained` must be {valid} or the path of a state_dict file)"
        )
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights_only errors all land here
        if path.suffix == ".params":
            hint = f"an MXNet .params file must first be converted to a state_dict, see {RESNET38_DOC}"
        else:
            hint = "it must be a torch.save file that torch.load(weights_only=True) accepts"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PretrainedWeightsError(f"could not read pretrained weights file {path} ({hint}): {first_line}") from err
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise PretrainedWeightsError(
            f"pretrained weights file {path} holds a {type(obj).__name__}, not a state_dict "
            "(a dict of tensors, or a dict with one under 'state_dict' or 'model')"
        )
    state = {_strip_prefix(str(k), "module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise PretrainedWeightsError(f"pretrained weights file {path} contains no tensors")
    return state


def _strip_prefix(key: str, prefix: str) -> str:
    while key.startswith(prefix):
        key = key[len(prefix) :]
    return key


def load_state_dict_into(
    module: nn.Module, state: Mapping[str, torch.Tensor], source: str, arch: str = ""
) -> LoadReport:
    """Copy the tensors of ``state`` whose names and shapes match ``module`` (strict=False).

    Raises :class:`PretrainedWeightsError` when no key matches or a matching key has another
    shape; logs the numbers of missing and unexpected keys.
    """
    own = module.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}
    if not any(k in own for k in state):
        # a whole method's state_dict (a classifier's model.pt): its backbone sits under
        # 'backbone.' or, for wrapping methods (e.g. '<m>+islfsl'), 'base.backbone.'; take the
        # prefix whose tensors match the most parameters (the shortest one on a tie)
        prefixes = {k[: k.index("backbone.") + len("backbone.")] for k in state if "backbone." in k}
        best, best_hits = None, 0
        for prefix in sorted(prefixes, key=len):
            hits = sum(k[len(prefix) :] in own for k in state if k.startswith(prefix))
            if hits > best_hits:
                best, best_hits = prefix, hits
        if best is not None:
            state = {k[len(best) :]: v for k, v in state.items() if k.startswith(best)}
    matched = {k: v for k, v in state.items() if k in own}
    what = f"backbone {arch!r}" if arch else type(module).__name__
    if not matched:
        raise PretrainedWeightsError(
            f"none of the {len(state)} keys in {source} matches a parameter of {what} "
            f"(file has e.g. {sorted(state)[:3]}, the backbone expects e.g. {list(own)[:3]})"
        )
    bad = [
        f"{k}: file {tuple(v.shape)} vs backbone {tuple(own[k].shape)}"
        for k, v in matched.items()
        if v.shape != own[k].shape
    ]
    if bad:
        raise PretrainedWeightsError(f"{len(bad)} tensors in {source} do not fit {what}: " + "; ".join(bad[:5]))
    module.load_state_dict(matched, strict=False)
    missing = [k for k in own if k not in matched and not k.endswith(_IGNORED_MISSING_SUFFIX)]
    unexpected = [k for k in state if k not in own]
    logger.info(
        "loaded %d tensors into %s from %s; %d backbone keys missing from the file, %d file keys unused",
        len(matched),
        what,
        source,
        len(missing),
        len(unexpected),
    )
    if missing:
        logger.warning(
            "%d keys of %s not in %s (left at their initial values), e.g. %s",
            len(missing),
            what,
            source,
            missing[:5],
        )
    if unexpected:
        logger.debug("unused keys in %s: %s", source, unexpected)
    return LoadReport(source=source, loaded=len(matched), missing=missing, unexpected=unexpected)
