"""Int8 vision weights (load(..., vision_weights="int8")): the vision tower's linear weights kept as q8_0 blocks, a
quarter of float32's memory, against the same model with float32 vision weights, on the tiny random checkpoints.

Measured (max |difference| / max |float32 value|), the same on both backends to 2 digits: image features v1 0.0094,
v2 0.0086; projector output (the image tokens) v1 0.0071, v2 0.0116; the logits after the prompt and the image
v1 0.0034, v2 0.0080, with the same greedy token. q8_0 rounds each weight by at most half a step of its block
(max |w| / 254); the LLM is float32 here, so all of the difference is the vision tower's.
"""
from __future__ import annotations

import numpy as np
import pytest

import tinyvlm
from tinyvlm.kernels.quant import QuantizedMatrix

QUESTION = "What is in the image?"
IMAGE = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
BOUND = 0.03  # measured at most 0.0116 (see above)


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name", ["v1", "v2"])
def test_int8_vision_weights_against_float32(checkpoints, backend_name, name: str) -> None:
    models = {w: tinyvlm.load(checkpoints[name].path, vision_weights=w) for w in ("float32", "int8")}
    layer = models["int8"].vision.layers[0]
    assert isinstance(layer.fc1[0], QuantizedMatrix) and layer.fc1[0].kind == "q8_0"
    assert not isinstance(models["float32"].vision.layers[0].fc1[0], QuantizedMatrix)
    pixels = models["float32"].preprocess(IMAGE)  # (3, H, W)
    results = {}
    for w, vlm in models.items():
        features = vlm.vision.features(pixels)
        image_tokens = vlm.encode_image(pixels)
        ids = vlm.prompt_ids(QUESTION)
        logits = vlm.language.forward(vlm.embed(ids, [image_tokens]), vlm.language.new_cache())
        results[w] = [np.asarray(features), np.asarray(image_tokens), np.asarray(logits)]
    errors = [rel_err(a, b) for a, b in zip(results["int8"], results["float32"])]
    assert all(0 < e <= BOUND for e in errors), errors  # above 0: the int8 weights were used
    assert results["int8"][2].argmax() == results["float32"][2].argmax()


@pytest.mark.parametrize("name", ["v2"])
def test_int8_vision_weights_multiply_float32_activations(checkpoints, backend_name, name: str) -> None:
    """The vision tower's q8_0 layers take dequantized tiles into BLAS whatever decode_activations says (on x86-64
    the Numba backend's int16 GEMM, on int8 activations, measured slower there): the same features either way."""
    models = [tinyvlm.load(checkpoints[name].path, vision_weights="int8", decode_activations=a)
              for a in ("int8", "float32")]
    pixels = models[0].preprocess(IMAGE)
    features = [np.asarray(vlm.vision.features(pixels)) for vlm in models]
    assert np.array_equal(features[0], features[1])
