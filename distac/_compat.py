"""Make torchvision importable on a CPU-only torch.

torchvision 0.28 ships only CUDA-linked wheels. On a CPU torch its C extension does not load, and its
fake-op registrations for ``torchvision::nms`` / ``torchvision::qnms`` then fail with
"operator torchvision::nms does not exist" — which also breaks ``import transformers`` models, ``import peft``
and ``import open_clip``. Defining the two op schemas ourselves, before torchvision is first imported and only
when its extension cannot load, lets transforms, models and datasets work (nms itself still does not).

The fix is applied two ways:

- ``import distac`` calls :func:`patch_torchvision` (works wherever distac is importable);
- installing distac (``pip install``, editable or not) also puts ``distac-torchvision.pth`` and a copy of this
  module, ``_distac_compat.py``, into site-packages (``build_support.py``). The ``.pth`` line runs at every
  interpreter start and only calls :func:`install_import_hook`: it puts a finder on ``sys.meta_path`` and
  imports nothing else (no torch), so interpreter start stays fast. The finder does its work the first time anything
  looks ``torchvision`` up (``import torchvision``, or transformers' ``importlib.util.find_spec``), then removes
  itself. So plain transformers / peft / open_clip scripts work in distac's environment without ``import
  distac``. ``DISTAC_NO_TORCHVISION_HOOK=1`` turns the interpreter-start hook off.

This module imports only ``os`` and ``sys`` at import time (the rest, torch included, lazily), and must stay that
way: it is executed at every interpreter start as ``_distac_compat``, outside the ``distac`` package.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at every interpreter start
if TYPE_CHECKING:
    from pathlib import Path

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # keeps the schema definitions alive for the life of the process
DISABLE_ENV = "DISTAC_NO_TORCHVISION_HOOK"


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
    import importlib.util  # here, not at the top: this module runs at every interpreter start
    from pathlib import Path

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    if _torchvision_extension_loads(Path(next(iter(spec.submodule_search_locations)))):
        return False
    import torch

    if hasattr(torch.ops.torchvision, "nms"):  # defined already: by the other copy of this module
        return False
    library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS.values():
        library.define(schema)
    _library = library
    return True


def _initializing(name: str) -> bool:
    """True while module ``name`` is still being imported (in sys.modules but not fully executed)."""
    module = sys.modules.get(name)
    return module is not None and bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


class TorchvisionImportHook:
    """A meta-path finder that applies :func:`patch_torchvision` right before ``torchvision`` is first found.

    It never finds anything itself (``find_spec`` returns None, so the normal finders import torchvision), and it
    never raises: a failure leaves torchvision's own error to be seen. It sits first on ``sys.meta_path``: a finder
    after the path finder would never be asked about an installed package.
    """

    _distac_torchvision_hook = True

    @classmethod
    def find_spec(cls, fullname: str, path: object = None, target: object = None) -> None:
        if fullname != "torchvision" or _initializing("torch"):
            return None  # torch half-imported (it probes for torchvision itself): wait for the next lookup
        uninstall_import_hook()
        try:
            patch_torchvision()
        except Exception:  # noqa: BLE001 - an import hook must not break imports
            pass
        return None


def install_import_hook() -> None:
    """Put :class:`TorchvisionImportHook` first on ``sys.meta_path`` (once); cheap: imports nothing."""
    if os.environ.get(DISABLE_ENV) or "torchvision" in sys.modules:
        return
    if not any(getattr(finder, "_distac_torchvision_hook", False) for finder in sys.meta_path):
        sys.meta_path.insert(0, TorchvisionImportHook)


def uninstall_import_hook() -> None:
    """Take :class:`TorchvisionImportHook` off ``sys.meta_path`` (it is needed once)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "_distac_torchvision_hook", False)]
