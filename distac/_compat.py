"""Make torchvision importable on a CPU-only torch.

torchvision 0.28 ships only CUDA-linked wheels. On a CPU torch its C extension does not load, and its
fake-op registrations for ``torchvision::nms`` / ``torchvision::qnms`` then fail with
"operator torchvision::nms does not exist" — which also breaks ``import transformers`` models and
``import open_clip``. Defining the two op schemas ourselves, before torchvision is first imported and only
when its extension cannot load, lets transforms, models and datasets work (nms itself still does not).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # keeps the schema definitions alive for the life of the process


def _torchvision_extension_loads(package_dir: Path) -> bool:
    import torch

    for candidate in sorted(package_dir.glob("_C*.so")) + sorted(package_dir.glob("_C*.pyd")):
        try:
            torch.ops.load_library(str(candidate))
            return True
        except (OSError, RuntimeError):
            return False
    return False


def patch_torchvision() -> bool:
    """Define the missing op schemas if torchvision's extension can't load. Returns True if patched."""
    global _library
    if _library is not None or "torchvision" in sys.modules:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    if _torchvision_extension_loads(Path(next(iter(spec.submodule_search_locations)))):
        return False
    import torch

    library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS.values():
        library.define(schema)
    _library = library
    return True
