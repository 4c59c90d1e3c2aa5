"""Every script in examples/ runs against a tiny checkpoint."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ask_one_image(checkpoints, shared_data):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "ask_one_image.py"), str(checkpoints["v1"].path),
         str(shared_data / "images" / "test-1.jpeg"), "What", "is", "this?"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "decode" in proc.stderr
