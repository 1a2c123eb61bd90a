"""distac: robust model merging with DisTaC task-vector conditioning."""

from distac._compat import patch_torchvision

patch_torchvision()

from distac.vectors import TaskVector  # noqa: E402

__all__ = ["TaskVector"]
__version__ = "0.1.0"
