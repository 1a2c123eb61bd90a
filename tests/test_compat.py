"""torchvision on a CPU torch: fixed by `import distac`, and by the interpreter-start hook that installing distac
puts into site-packages (distac-torchvision.pth), so plain transformers / peft / open_clip scripts work too."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distac._compat import DISABLE_ENV

HOOK_ON_META_PATH = "any(getattr(f, '_distac_torchvision_hook', False) for f in sys.meta_path)"

# A user's own script: no `import distac` anywhere (asserted at its end)
PLAIN_TRANSFORMERS = """
import sys
import torch
from transformers import AutoModelForSequenceClassification, BertConfig

config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32, max_position_embeddings=32, num_labels=3)
torch.manual_seed(0)
model = AutoModelForSequenceClassification.from_config(config).eval()
with torch.no_grad():
    logits = model(input_ids=torch.tensor([[1, 5, 7, 2]])).logits
assert tuple(logits.shape) == (1, 3), logits.shape
assert torch.isfinite(logits).all()
assert 'distac' not in sys.modules
print('ok')
"""


def _run(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`python -c code` in a fresh interpreter of this environment, from a directory without the project."""
    environ = {k: v for k, v in os.environ.items() if k != DISABLE_ENV}
    environ.update(HF_HUB_OFFLINE="1", **env)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=environ, capture_output=True, text=True,
                          timeout=300)


def _torchvision_needs_the_fix() -> bool:
    """False where torchvision's C extension loads (a CUDA torch): there is nothing to fix or to reproduce."""
    from distac._compat import _torchvision_extension_loads

    spec = importlib.util.find_spec("torchvision")
    assert spec is not None and spec.submodule_search_locations
    return not _torchvision_extension_loads(Path(next(iter(spec.submodule_search_locations))))


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


@pytest.mark.parametrize("code", [
    PLAIN_TRANSFORMERS,
    "import sys, peft; assert 'distac' not in sys.modules; print('ok')",
    "import sys, open_clip; assert 'distac' not in sys.modules; print('ok')",
    "import sys, torchvision; from torchvision import transforms; transforms.ToTensor(); "
    f"assert 'distac' not in sys.modules and not {HOOK_ON_META_PATH}; print('ok')",  # the hook is one-shot
    # both fixes in one process, either order: no "Only a single TORCH_LIBRARY ..." clash
    "from transformers import AutoModelForSequenceClassification; import distac, torchvision, open_clip; print('ok')",
    "import distac; from transformers import AutoModelForSequenceClassification; import peft; print('ok')",
], ids=["plain-transformers", "peft", "open_clip", "torchvision", "transformers-then-distac", "distac-then-peft"])
def test_scripts_work_in_distacs_environment_without_import_distac(code, tmp_path):
    result = _run(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_the_interpreter_start_hook_is_installed_and_imports_no_torch(tmp_path):
    result = _run(f"import sys; print({HOOK_ON_META_PATH}, 'torch' in sys.modules)", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "False"]


def test_the_hook_can_be_turned_off(tmp_path):
    result = _run(f"import sys; print({HOOK_ON_META_PATH})", tmp_path, **{DISABLE_ENV: "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False"]
    if not _torchvision_needs_the_fix():
        pytest.skip("torchvision's extension loads here: the failure the hook fixes cannot be reproduced")
    result = _run(PLAIN_TRANSFORMERS, tmp_path, **{DISABLE_ENV: "1"})
    assert result.returncode != 0
    assert "torchvision::nms does not exist" in result.stderr
