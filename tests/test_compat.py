"""`import distac` makes torchvision (and so transformers and open_clip) importable on a CPU torch."""

import subprocess
import sys


def test_torchvision_transformers_and_open_clip_import_after_distac():
    code = ("import distac, torchvision, open_clip; "
            "from transformers import BertModel; "
            "from torchvision import transforms; transforms.ToTensor(); print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_patch_is_a_no_op_once_torchvision_is_imported():
    import torchvision  # noqa: F401

    from distac._compat import patch_torchvision

    assert patch_torchvision() is False
