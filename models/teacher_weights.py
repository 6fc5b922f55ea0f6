"""Where the teacher's ImageNet weights come from, and a plain statement of which ones were used."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from models.feature_extractor import build_network, is_head, pinned_weights
from utils.digests import file_sha256, tensors_digest
from utils.errors import UserError


# Addresses whose download failed in this process, when a random teacher may stand in: the
# failure is said once, not once per category of a sweep.
_UNAVAILABLE: set[str] = set()
_RANDOM_FALLBACK = "random init (ImageNet weights unavailable, model.fallback_to_random=true)"


def fingerprint_weights(state: Mapping[str, Tensor]) -> str:
    """A short hash of the source weights a teacher is built from (classification head excluded).

    Taken from the weights as loaded, never from a built module, so that nothing a module does
    to its tensors (such as a BatchNorm updating running statistics) can hide behind it.
    """
    return tensors_digest(state, skip=is_head)[:16]


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A state_dict from a file, unwrapped from {'state_dict': ...}/{'model': ...} and 'module.' prefixes."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt or foreign file
        raise UserError(f"cannot read teacher weights {path} ({type(e).__name__}); "
                        "give a state_dict saved with torch.save(model.state_dict(), path)") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        raise UserError(f"teacher weights {path} hold no state_dict; save one with torch.save(model.state_dict(), path)")
    return {k.removeprefix("module."): v for k, v in data.items()}


def resolve_teacher_weights(backbone: str, pretrained: bool, teacher_weights: str | None,
                            fallback_to_random: bool, url: str | None = None,
                            model_dir: str | None = None) -> tuple[Mapping[str, Tensor] | None, str]:
    """The teacher's state_dict (None = random init) and a sentence saying which weights these are.

    Order: a local ``teacher_weights`` file; else torchvision's pinned IMAGENET1K_V1 weights when
    ``pretrained`` (downloaded once into torch's hub cache, hash-checked); else random init.
    ``url``/``model_dir`` replace torchvision's address and cache folder (tests use a loopback server).
    Raises UserError when the weights cannot be had, unless ``fallback_to_random``.
    """
    if teacher_weights:
        path = Path(teacher_weights).expanduser()
        if path.is_dir():
            raise UserError(f"model.teacher_weights {path} is a folder; give the path of a {backbone} state_dict file "
                            "in it")
        if not path.is_file():
            raise UserError(f"model.teacher_weights file {path} does not exist; give the path of a {backbone} state_dict")
        state = read_state_dict(path)
        try:
            build_network(backbone, state)
        except (ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0][:200]
            raise UserError(f"model.teacher_weights {path} does not fit backbone {backbone} ({first}); "
                            f"give {backbone} weights or set model.backbone to the file's architecture") from None
        return state, f"local file {path} (sha256 {file_sha256(path)[:16]})"
    if not pretrained:
        return None, "random init (model.pretrained=false): not an ImageNet teacher"
    weights = pinned_weights(backbone)
    name = f"torchvision {type(weights).__name__}.{weights.name}"
    url = url or weights.url
    if fallback_to_random and url in _UNAVAILABLE:  # said once per process: a sweep does not try again
        return None, _RANDOM_FALLBACK
    try:
        state = torch.hub.load_state_dict_from_url(url, model_dir=model_dir, map_location="cpu",
                                                   progress=True, check_hash=True)
    except Exception as e:  # URLError, timeouts, hash mismatch: all mean "no weights here"
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120]}" if str(e).strip() else type(e).__name__
        if fallback_to_random:
            message = (f"could not get {name} ({reason}); using a RANDOM teacher because "
                       "model.fallback_to_random=true: scores show the pipeline works, not the method's quality")
            print(f"warning: {message}", file=sys.stderr)
            _UNAVAILABLE.add(url)
            return None, _RANDOM_FALLBACK
        file_name = url.rsplit("/", 1)[-1]
        raise UserError(f"cannot download {name} from {url} ({reason}); without internet, copy {file_name} here "
                        f"and set model.teacher_weights=/path/to/{file_name}, or put it in torch's hub cache "
                        f"({torch.hub.get_dir()}/checkpoints)") from None
    return state, name
