"""Build step (pyproject.toml: [tool.setuptools.cmdclass]): install distac's torchvision fix at interpreter start.

Every install of distac — a wheel (``pip install distac[...]``, ``pip install .``) or editable (``pip install -e``,
what ``make`` runs) — also puts two files at the top of site-packages:

- ``distac-torchvision.pth``: ``import _distac_compat; _distac_compat.install_import_hook()``, run by ``site`` at
  every interpreter start (cheap: it imports no torch, see distac/_compat.py);
- ``_distac_compat.py``: distac/_compat.py itself (wheel), or for an editable install a loader that runs the
  project's distac/_compat.py, so an edit there takes effect without reinstalling.

So plain transformers / peft / open_clip scripts work in distac's environment without ``import distac``.
``pip uninstall distac`` removes both files (they are in the install's RECORD).
"""

from __future__ import annotations

from pathlib import Path

from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SOURCE = ROOT / "distac" / "_compat.py"
MODULE = "_distac_compat"
PTH_NAME = "distac-torchvision.pth"
PTH_LINE = f"import {MODULE}; {MODULE}.install_import_hook()\n"

EDITABLE_LOADER = '''"""Written by distac's editable install (build_support.py): runs the project's distac/_compat.py."""
import os as _os

_SOURCE = {source!r}
if _os.path.isfile(_SOURCE):
    import importlib.machinery as _machinery

    # get_code: the bytecode cached in distac/__pycache__ (compiling the source would cost ms at every start)
    exec(_machinery.SourceFileLoader(__name__, _SOURCE).get_code(__name__), globals())
else:  # the project moved or was deleted: do nothing rather than fail every interpreter start

    def install_import_hook():
        return None
'''


def site_files(editable: bool) -> dict[str, str]:
    """The files to put at the top of site-packages: {name: text}."""
    module = EDITABLE_LOADER.format(source=str(SOURCE)) if editable else SOURCE.read_text(encoding="utf-8")
    return {f"{MODULE}.py": module, PTH_NAME: PTH_LINE}


class BuildPy(build_py):
    """build_py that also writes :func:`site_files` into the wheel's root (= site-packages)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            # setuptools' editable_wheel builds into a throw-away build_lib; what goes into the editable wheel is
            # its unpacked directory, which it configures as the install command's install_lib.
            target = Path(self.get_finalized_command("install").install_lib)
            if not any(target.glob("*.dist-info")):
                raise RuntimeError(f"distac build_support: {target} is not an unpacked editable wheel; "
                                   "this setuptools version lays editable builds out differently")
            self._write(target, editable=True)
        else:
            self._site_outputs = self._write(Path(self.build_lib), editable=False)

    def _write(self, target: Path, *, editable: bool) -> list[str]:
        written = []
        for name, text in site_files(editable).items():
            path = target / name
            path.write_text(text, encoding="utf-8")
            written.append(str(path))
        return written

    def get_outputs(self, include_bytecode=1):
        return list(super().get_outputs(include_bytecode)) + list(getattr(self, "_site_outputs", []))
