"""The package's import layers: io at the bottom (nothing of ours), towers and interop below export."""

import subprocess
import sys


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(m for m in sys.modules if m.startswith('mmpretrain')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return set(out.stdout.split())


def test_io_imports_nothing_of_ours_and_towers_never_import_export():
    assert _modules_after("import mmpretrain.io") == {"mmpretrain", "mmpretrain.io"}
    towers = _modules_after("import mmpretrain.towers.open_clip, mmpretrain.towers.timm, mmpretrain.towers.audio")
    assert "mmpretrain.export" not in towers and "mmpretrain.model" not in towers
    assert "mmpretrain.interop.open_clip" in towers
    interop = _modules_after("import mmpretrain.interop.open_clip, mmpretrain.interop.torchscript")
    assert interop <= {"mmpretrain", "mmpretrain.io", "mmpretrain.interop", "mmpretrain.interop.open_clip",
                       "mmpretrain.interop.torchscript"}
