"""The package's layout: every import points down the layers, and no module grows past about 300 lines.

    cli -> public API and loading -> vlm / chat -> model parts -> backends -> kernels -> weights, config, limits, errors

A module may import from its own layer or any layer below it, never above. Imports inside functions count too
(they are how heavy modules stay lazy, and they are arrows all the same). The tests import torch and transformers,
their oracles, only inside the tests that use them, so the others also run where torch is not installed.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

BACKEND_FREE = True
PACKAGE = Path(__file__).resolve().parents[1] / "tinyvlm"

# Highest layer first. A name ending in "." covers a package and everything in it.
LAYERS = [
    ("cli", ["tinyvlm.cli", "tinyvlm.__main__", "tinyvlm.options"]),
    ("server and batch", ["tinyvlm.server", "tinyvlm.openai_api", "tinyvlm.batch", "tinyvlm.batch_ray"]),
    ("public API and loading", ["tinyvlm", "tinyvlm.loading."]),
    ("composition", ["tinyvlm.vlm", "tinyvlm.chat"]),
    ("model parts", ["tinyvlm.vision", "tinyvlm.projector", "tinyvlm.language", "tinyvlm.cache", "tinyvlm.generate",
                     "tinyvlm.prompt", "tinyvlm.tokenizer", "tinyvlm.stream", "tinyvlm.gguf_vocab", "tinyvlm.processor",
                     "tinyvlm.quantize", "tinyvlm.image_cache", "tinyvlm.json_constraint",
                     "tinyvlm.json_grammar"]),
    ("backends", ["tinyvlm.backends."]),
    ("kernels", ["tinyvlm.kernels."]),
    ("files and settings", ["tinyvlm.weights.", "tinyvlm.config.", "tinyvlm.limits", "tinyvlm.errors"]),
]
MAX_LINES = 330  # "about 300"


def _module_name(path: Path) -> str:
    parts = ["tinyvlm", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """The index in LAYERS (0 = top) of the layer holding `module`, by its most specific entry."""
    best, best_len = -1, -1
    for index, (_, names) in enumerate(LAYERS):
        for name in names:
            covers = module == name.rstrip(".") or (name.endswith(".") and module.startswith(name))
            if covers and len(name) > best_len:
                best, best_len = index, len(name)
    return best


def imports_of(path: Path) -> set[str]:
    """The tinyvlm modules `path` imports, anywhere in it (`from tinyvlm.kernels import quant` is kernels.quant)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "tinyvlm")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tinyvlm":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


def test_every_module_has_a_layer() -> None:
    assert [m for m in MODULES if layer_of(m) < 0] == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    here = layer_of(module)
    upward = [f"{module} ({LAYERS[here][0]}) -> {target} ({LAYERS[layer_of(target)][0]})"
              for target in sorted(imports_of(MODULES[module])) if layer_of(target) < here]
    assert upward == []


def test_the_checker_sees_an_upward_arrow(tmp_path: Path) -> None:
    """The test above can fail: a kernel importing a model part is an upward arrow."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from tinyvlm.language import LanguageModel\n")
    assert imports_of(bad) == {"tinyvlm.language"}
    assert layer_of("tinyvlm.language") < layer_of("tinyvlm.kernels.quant")
    assert layer_of("tinyvlm.weights.gguf") > layer_of("tinyvlm.kernels.quant")  # weights never import kernels


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module: str) -> None:
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{module}: {lines} lines"


def test_collecting_the_tests_imports_neither_torch_nor_transformers() -> None:
    """.ci/arm64.sh runs the kernel tests where torch is not installed: collecting the whole suite with torch and
    transformers made unimportable must still work."""
    code = ("import sys; sys.modules.update(torch=None, transformers=None)  # `import torch` now raises\n"
            "import pytest; sys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', 'tests']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
