"""Backends: the object each model holds (tinyvlm/backends). The NumPy backend is the oracle: the Numba backend's
ops and whole-model logits are compared with it, two models on different backends live in one process, and a
compiling backend has compiled everything a generation needs by the end of `load`.

Tolerances: an op agrees to 1e-5 of its output's scale (float32 with reassociated sums); whole-model logits to
1e-5 absolute (logits of std ~1); quantized linears within the bound tests/test_kernels_quant.py states.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.test_kernels_quant import assert_close, make_weight
from tinyvlm import backends
from tinyvlm.backends import NumpyBackend
from tinyvlm.config import TextConfig
from tinyvlm.errors import TinyVLMError
from tinyvlm.kernels import _numba, quant
from tinyvlm.language import LanguageModel, language_expected_shapes

BACKEND_FREE = True  # each test chooses its backends itself
pytestmark = pytest.mark.skipif(not _numba.available(), reason="numba is installed wherever the tests run in CI")


def rand(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


@pytest.fixture(scope="module")
def pair() -> tuple[NumpyBackend, NumpyBackend]:
    return backends.make("numpy"), backends.make("numba")


def test_make_names_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TINYVLM_BACKEND", raising=False)
    assert backends.default_name() == "numba" and backends.make().name == "numba"
    monkeypatch.setenv("TINYVLM_BACKEND", "numpy")
    assert backends.make().name == "numpy" and backends.make("numba").name == "numba"
    monkeypatch.setenv("TINYVLM_BACKEND", "tpu")
    with pytest.raises(TinyVLMError,
                       match="unknown backend 'tpu' from TINYVLM_BACKEND; expected one of numpy, numba, cuda"):
        backends.make()
    with pytest.raises(TinyVLMError, match="unknown backend 'torch' from backend"):
        backends.make("torch")
    with pytest.raises(TinyVLMError, match="threads must be an integer of at least 1, got 0"):
        backends.make("numpy", threads=0)
    with pytest.raises(TinyVLMError, match="threads must be between 1 and"):
        backends.make("numba", threads=10_000)
    monkeypatch.setenv("TINYVLM_BACKEND", "numpy")
    # the two settings read from the environment: argument, variable, default, the other value, the error's words
    settings = (("decode_activations", "TINYVLM_DECODE_ACTIVATIONS", "int8", "float32", "decode activations"),
                ("vision_weights", "TINYVLM_VISION_WEIGHTS", "float32", "int8", "vision weights"))
    for arg, variable, default, other, what in settings:
        choices = ", ".join(backends.DECODE_ACTIVATIONS if arg == "decode_activations" else backends.VISION_WEIGHTS)
        assert getattr(backends.make(), arg) == default
        assert getattr(backends.make("numba", **{arg: other}), arg) == other
        with pytest.raises(TinyVLMError, match=f"unknown {what} 'int4'; expected one of {choices}"):
            backends.make(**{arg: "int4"})
        monkeypatch.setenv(variable, "fp16")
        with pytest.raises(TinyVLMError, match=f"'fp16' from {variable}; expected one of {choices}"):
            backends.make()
        monkeypatch.setenv(variable, other)
        assert getattr(backends.make(), arg) == other


def test_without_numba_the_default_is_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TINYVLM_BACKEND", raising=False)
    monkeypatch.setattr(_numba, "_import", lambda: (None, "simulated: no numba"))
    assert backends.make().name == "numpy"
    with pytest.raises(TinyVLMError, match="the numba backend is unavailable: simulated"):
        backends.make("numba")


def test_numba_missing_in_a_fresh_process() -> None:
    code = (
        "import sys; sys.modules['numba'] = None\n"  # makes `import numba` raise ImportError
        "import numpy as np\n"
        "from tinyvlm import backends\n"
        "from tinyvlm.kernels import quant, _numba\n"
        "qm = quant.quantize(np.full((4, 32), 127 / 128, np.float32), 'q8_0')  # exact: d = 1/128\n"
        "bk = backends.make()\n"
        "y = bk.linear(np.ones(32, np.float32), qm)\n"
        "print(bk.name, float(y.sum()), _numba.why_unavailable())\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TINYVLM_BACKEND"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    name, total, reason = result.stdout.split(" ", 2)
    assert (name, float(total)) == ("numpy", 127.0) and "numba could not be imported" in reason


@pytest.mark.parametrize("kind", quant.KINDS)
def test_linear_agrees(pair: tuple[NumpyBackend, NumpyBackend], kind: str) -> None:
    qm = quant.quantize(make_weight("normal", 40, 128, seed=7), kind)
    dense = quant.dequantize(qm)
    bias = make_weight("normal", 1, 40, seed=3)[0]
    for x in (make_weight("normal", 1, 128, seed=8)[0], make_weight("normal", 6, 128, seed=9)):
        results = {}
        for bk in pair:
            results[bk.name] = bk.linear(x, qm)
            assert np.array_equal(bk.linear(x, dense), x @ dense.T)
            np.testing.assert_array_equal(bk.linear(x, dense, bias), x @ dense.T + bias)
        for a, b, row in zip(np.atleast_2d(results["numba"]), np.atleast_2d(results["numpy"]), np.atleast_2d(x)):
            assert_close(a, b, row, qm)


def test_linears_prepare_groups(pair: tuple[NumpyBackend, NumpyBackend]) -> None:
    """numpy keeps every matrix; numba stacks a group quantized alike and packs all quantized matrices in one
    buffer; linear_split and swiglu give the same numbers either way."""
    rng = np.random.default_rng(0)
    q, k, v = (quant.quantize(rand(rng, (out, 64), 0.1), "q4_0") for out in (64, 32, 32))
    gate, up = (quant.quantize(rand(rng, (96, 64), 0.1), "q8_0") for _ in range(2))
    mixed = [rand(rng, (16, 64)), quant.quantize(rand(rng, (16, 64)), "q4_0")]
    x = rand(rng, (5, 64))
    numpy_bk, numba_bk = pair
    prepared = {bk.name: bk.linears([[q, k, v], [gate, up], mixed]) for bk in pair}
    assert [len(g) for g in prepared["numpy"]] == [3, 2, 2]
    assert [len(g) for g in prepared["numba"]] == [1, 1, 2]  # the mixed group stays apart
    numba_mats = [w for g in prepared["numba"] for w in g if isinstance(w, quant.QuantizedMatrix)]
    assert len({id(w.qs.base) for w in numba_mats}) == 1  # one buffer
    for bk in pair:
        qkv, gate_up, _ = prepared[bk.name]
        got = bk.linear_split(x, qkv, [64, 32, 32])
        want = numpy_bk.linear_split(x, prepared["numpy"][0], [64, 32, 32])
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())
        np.testing.assert_allclose(bk.swiglu(x, gate_up), numpy_bk.swiglu(x, prepared["numpy"][1]), rtol=1e-5,
                                   atol=1e-6)


def test_ops_agree(pair: tuple[NumpyBackend, NumpyBackend]) -> None:
    """Every op the Numba backend overrides, against the NumPy backend on the same inputs."""
    rng = np.random.default_rng(1)
    numpy_bk, numba_bk = pair
    x, w, b = rand(rng, (7, 48)), rand(rng, (48,)), rand(rng, (48,))

    def same(name: str, *args: np.ndarray, **kw: object) -> None:
        want = getattr(numpy_bk, name)(*(a.copy() for a in args), **kw)
        got = getattr(numba_bk, name)(*(a.copy() for a in args), **kw)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(np.abs(want).max(), 1.0), err_msg=name)

    same("rms_norm", x, w, eps=1e-6)
    same("layer_norm", x, w, b, eps=1e-5)
    same("quick_gelu_", x * 4)
    same("gelu_", x * 4)
    cos, sin = numpy_bk.rope_tables(16, 7, 1e4)
    same("apply_rope", rand(rng, (3, 7, 16)), cos, sin)
    keys, values = rand(rng, (9, 2, 16)), rand(rng, (9, 2, 16))
    numba_bk._numba_attention = True  # as with quantized layers
    same("decode_attention", rand(rng, (4, 16)), keys, values, length=6, scale=0.25)
    q, k, v = rand(rng, (2, 5, 8)), rand(rng, (2, 5, 8)), rand(rng, (2, 5, 8))
    outs = [bk.attention(q.copy(), k, v, 0.35, out=np.empty((5, 2, 8), np.float32)) for bk in pair]
    np.testing.assert_allclose(outs[1], outs[0], rtol=0, atol=1e-6)


def _tiny_llm(backend: NumpyBackend, quant_kind: str | None) -> LanguageModel:
    rng = np.random.default_rng(5)
    cfg = TextConfig(hidden_size=96, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
                     intermediate_size=160, vocab_size=50, max_position_embeddings=64, rms_norm_eps=1e-6)
    weights = {name: rand(rng, shape, 0.1) for name, shape in language_expected_shapes(cfg).items()}
    if quant_kind:
        weights = {n: quant.quantize(w, quant_kind) if w.ndim == 2 and "embed" not in n else w
                   for n, w in weights.items()}
    return LanguageModel(cfg, weights, backend)


@pytest.mark.parametrize("quant_kind", [None, "q4_0", "q8_0"])
def test_two_models_on_different_backends_in_one_process(quant_kind: str | None) -> None:
    """No module-level backend state: a NumPy model and a Numba model (2 threads, and 1) interleave their calls
    and each gives its own backend's logits: the same within float32 reassociation."""
    models = [_tiny_llm(backends.make("numpy"), quant_kind), _tiny_llm(backends.make("numba", threads=1), quant_kind),
              _tiny_llm(backends.make("numba", threads=2), quant_kind)]
    ids = [3, 14, 15, 9, 26, 5, 35, 8, 9, 7]
    caches = [m.new_cache(32) for m in models]
    logits: list[list[np.ndarray]] = [[] for _ in models]
    for i, m in enumerate(models):  # prefill, interleaved
        logits[i].append(m.forward(m.embed(ids[:6]), caches[i]))
    for t in ids[6:]:  # decode, interleaved token by token
        for i, m in enumerate(models):
            logits[i].append(m.forward(m.embed([t]), caches[i]))
    assert [m.bk.name for m in models] == ["numpy", "numba", "numba"]
    for other in logits[1:]:
        np.testing.assert_allclose(np.stack(other), np.stack(logits[0]), rtol=0, atol=1e-5)
    assert _numba.get_threads() == 2  # the last forward ran the 2-thread model


_FRESH_PROCESS = """
import sys, numpy as np, tinyvlm
from tinyvlm.kernels import ops_numba, quant_int8, quant_numba

def signatures():
    return {f"{m.__name__}.{name}": len(f.signatures) for m in (ops_numba, quant_int8, quant_numba)
            for name, f in vars(m).items() if hasattr(f, "signatures") and hasattr(f, "py_func")}

vlm = tinyvlm.load(sys.argv[1], quant=sys.argv[2] if sys.argv[2] != "none" else None)
before = signatures()
image = np.zeros((40, 60, 3), np.uint8) if vlm.vision is not None else None
vlm.generate("What is in the image?", image=image, max_new_tokens=3)
chat = vlm.chat()
chat.send("Hello", max_new_tokens=2)
chat.send("Again", max_new_tokens=2)
after = signatures()
print(sum(before.values()), {k: (before[k], v) for k, v in after.items() if v != before[k]})
"""


@pytest.mark.parametrize("name, quant_arg", [("v2", "int4"), ("v1", "none"), ("text", "int8")])
def test_load_compiles_every_kernel_a_generation_uses(checkpoints: dict, name: str, quant_arg: str) -> None:
    """In a fresh process on the numba backend, answering about an image after load() compiles (or loads from
    numba's cache) no kernel: load has done it."""
    env = dict(__import__("os").environ, TINYVLM_BACKEND="numba")
    result = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, str(checkpoints[name].path), quant_arg],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    compiled_at_load, compiled_later = result.stdout.split(" ", 1)
    assert int(compiled_at_load) >= 5 and compiled_later.strip() == "{}", result.stdout
