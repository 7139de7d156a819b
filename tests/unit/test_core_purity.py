"""fedbip_ray.core must import without ray, mlflow, transformers, peft or torch."""

from __future__ import annotations

import subprocess
import sys

CHECK = (
    "import fedbip_ray.core, sys; "
    "bad=[m for m in ('ray','mlflow','transformers','peft','torch') if m in sys.modules]; "
    "assert not bad, bad"
)


def test_core_imports_no_heavy_frameworks() -> None:
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
