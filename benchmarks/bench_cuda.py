"""MobileVLM_V2-1.7B on an NVIDIA GPU (random weights at its real shapes), one engine per run: tinyvlm's CUDA
backend with an int4 (Q4_0) or fp16 LLM, or PyTorch + transformers fp16 (CLIPVisionModel with 23 layers + an
LDPv2 of torch.nn layers + LlamaForCausalLM with its cache) on the same GPU.

Prints one JSON line: image encode ms (pixels -> 144 image tokens), prefill tok/s of the templated image prompt,
greedy decode tok/s, time to first token ms (raw image -> first id: preprocess, encode, splice, prefill, argmax),
peak device memory (CuPy's pool / torch's allocator) and, for tinyvlm, its own kernel launches per decode step
(CuPy's array operations add theirs). Every timing ends with the device synchronized.
`--emulated --layers 1` runs tinyvlm's engine through the backend's emulated device (NumPy) at the real widths:
a check of this script where there is no GPU, not a measurement.
Run: `python benchmarks/bench_cuda.py --engine tinyvlm --llm int4` (benchmarks/run_all.py --backend cuda runs all).
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

import numpy as np

from _common import PROJECTOR, TEXT, TOKENIZER, VISION, emit, median, random_weights
from bench_vision import PROJECTOR_TOKENS, _prompt_ids, torch_ldpv2

from tinyvlm.config import ModelConfig
from tinyvlm.image_cache import ImageCache
from tinyvlm.language import LanguageModel, language_expected_shapes
from tinyvlm.processor import preprocess
from tinyvlm.projector import build_projector, projector_expected_shapes
from tinyvlm.tokenizer import Tokenizer
from tinyvlm.vision import VisionTower, vision_expected_shapes, vision_needed_names
from tinyvlm.vlm import VLM

SHAPES = "MobileVLM_V2-1.7B: ViT-L/14-336 (23 layers run) + LDPv2 -> 144 tokens + MobileLLaMA-1.4B"


class TinyVLM:
    def __init__(self, llm: str, emulated: bool, text, vision) -> None:
        from tinyvlm.backends.cuda import CudaBackend
        from tinyvlm.backends.cuda_device import Device

        self.backend = CudaBackend(precision="float32" if emulated else "float16",  # NumPy has no fast float16 GEMM
                                   device=Device.emulated() if emulated else None)
        self.xp = self.backend.xp
        rng = np.random.default_rng(0)
        needed = vision_needed_names(vision)
        tower = VisionTower(vision, random_weights({n: s for n, s in vision_expected_shapes(vision).items()
                                                    if n in needed}, rng), self.backend)
        projector = build_projector(PROJECTOR, random_weights(projector_expected_shapes(PROJECTOR), rng),
                                    self.backend)
        weights: dict[str, Any] = random_weights(language_expected_shapes(text), rng)
        if llm == "int4":
            from tinyvlm.quantize import quantize_language

            weights, _report = quantize_language(text, weights, "int4")
        self.language = LanguageModel(text, weights, self.backend)
        self.vlm = VLM(ModelConfig(text=text, vision=vision, projector=PROJECTOR),
                       Tokenizer.from_sentencepiece(TOKENIZER), self.language, tower, projector)
        self.vlm.image_cache = ImageCache(0)  # every round encodes
        self.vlm.warm_up()

    def sync(self) -> None:
        if self.xp is not np:
            self.xp.cuda.Device().synchronize()

    def encode(self, pixels: np.ndarray) -> Any:
        tokens = self.vlm.encode_image(pixels)
        self.sync()
        return tokens

    def prefill(self, ids: list[int], tokens: Any) -> tuple[int, Any]:
        cache = self.language.new_cache()
        return self.language.greedy_next(self.vlm.embed(ids, [tokens]), cache), cache

    def decode(self, token: int, cache: Any, n: int) -> None:
        for _ in range(n):
            token = self.language.greedy_next(self.language.embed([token]), cache)

    def memory_mib(self) -> float | None:
        return None if self.xp is np else self.xp.get_default_memory_pool().total_bytes() / 2**20

    def launches(self) -> int:
        return self.backend.device.launches


class Torch:
    def __init__(self, text, vision) -> None:
        import torch
        from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

        self.torch, device = torch, torch.device("cuda")
        torch.manual_seed(0)
        self.clip = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
            num_hidden_layers=vision.layers_to_run, num_attention_heads=vision.num_attention_heads,
            image_size=vision.image_size, patch_size=vision.patch_size, hidden_act=vision.hidden_act,
            layer_norm_eps=vision.layer_norm_eps)).to(device, torch.float16).eval()
        self.projector = torch_ldpv2(PROJECTOR.mm_hidden_size, PROJECTOR.hidden_size).to(device, torch.float16).eval()
        self.llm = LlamaForCausalLM(LlamaConfig(
            hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
            num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
            num_key_value_heads=text.num_key_value_heads, vocab_size=text.vocab_size,
            max_position_embeddings=text.max_position_embeddings, rms_norm_eps=text.rms_norm_eps,
            rope_theta=text.rope_theta, tie_word_embeddings=False)).to(device, torch.float16).eval()
        self.embed_tokens = self.llm.get_input_embeddings()

    def sync(self) -> None:
        self.torch.cuda.synchronize()

    def encode(self, pixels: np.ndarray) -> Any:
        with self.torch.inference_mode():
            x = self.torch.from_numpy(pixels)[None].to("cuda", self.torch.float16)
            tokens = self.projector(self.clip(pixel_values=x).last_hidden_state[:, 1:])  # (1, N, D)
        self.sync()
        return tokens

    def prefill(self, ids: list[int], tokens: Any) -> tuple[int, Any]:
        at = ids.index(-200)
        torch = self.torch
        with torch.inference_mode():
            before, after = (self.embed_tokens(torch.tensor([part], device="cuda"))
                             for part in (ids[:at], ids[at + 1:]))
            out = self.llm(inputs_embeds=torch.cat([before, tokens, after], dim=1), use_cache=True, logits_to_keep=1)
        return int(out.logits[0, -1].argmax()), out.past_key_values

    def decode(self, token: int, cache: Any, n: int) -> None:
        torch = self.torch
        with torch.inference_mode():
            for _ in range(n):
                out = self.llm(input_ids=torch.tensor([[token]], device="cuda"), past_key_values=cache,
                               use_cache=True)
                cache, token = out.past_key_values, int(out.logits[0, -1].argmax())

    def memory_mib(self) -> float:
        return self.torch.cuda.max_memory_allocated() / 2**20

    def launches(self) -> None:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=("tinyvlm", "torch"), required=True)
    ap.add_argument("--llm", choices=("int4", "fp16"), default="int4", help="tinyvlm's LLM weights (torch: fp16)")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5, help="timed rounds; medians are reported")
    ap.add_argument("--threads", type=int, help="ignored (run_all passes it)")
    ap.add_argument("--emulated", action="store_true", help="tinyvlm on the emulated device: checks the script")
    ap.add_argument("--layers", type=int, help="run only this many ViT and LLM layers (with --emulated)")
    args = ap.parse_args()
    text, vision = TEXT, VISION
    if args.layers:
        text = dataclasses.replace(TEXT, num_hidden_layers=args.layers)
        vision = dataclasses.replace(VISION, num_hidden_layers=args.layers + 1)  # select_layer -2: layers runs
    record: dict[str, Any] = {"bench": "cuda", "engine": f"{args.engine}-cuda", "shapes": SHAPES,
                              "llm": args.llm if args.engine == "tinyvlm" else "fp16",
                              "dense_weights": "fp32" if args.emulated else "fp16"}
    try:
        t0 = time.perf_counter()
        engine = TinyVLM(args.llm, args.emulated, text, vision) if args.engine == "tinyvlm" else Torch(text, vision)
        record["load_s"] = round(time.perf_counter() - t0, 2)
        record["device"] = _device_name(engine)
    except Exception as e:  # no GPU, no CuPy, no driver: one error line, as run_all expects
        emit({**record, "error": f"{type(e).__name__}: {e}"})
        return
    ids = _prompt_ids()
    image = np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    token, cache = engine.prefill(ids, engine.encode(preprocess(image)))  # warm-up
    engine.decode(token, cache, 2)
    encode_s, prefill_s, ttft_s, decode_s, launches = [], [], [], [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        pixels = preprocess(image)
        t1 = time.perf_counter()
        tokens = engine.encode(pixels)
        t2 = time.perf_counter()
        token, cache = engine.prefill(ids, tokens)  # an int back: the device is done
        t3 = time.perf_counter()
        before = engine.launches()
        engine.decode(token, cache, args.decode_tokens)
        t4 = time.perf_counter()
        if before is not None:
            launches.append((engine.launches() - before) / args.decode_tokens)
        encode_s.append(t2 - t1)
        prefill_s.append(t3 - t2)
        ttft_s.append(t3 - t0)
        decode_s.append(t4 - t3)
    prompt_tokens = len(ids) - 1 + PROJECTOR_TOKENS
    record.update(image_encode_ms=round(1e3 * median(encode_s), 2), prompt_tokens=prompt_tokens,
                  prefill_tok_s=round(prompt_tokens / median(prefill_s), 1), ttft_ms=round(1e3 * median(ttft_s), 2),
                  decode_tok_s=round(args.decode_tokens / median(decode_s), 1), device_memory_mib=engine.memory_mib(),
                  tinyvlm_launches_per_decode_step=median(launches) if launches else None, runs=args.repeat,
                  layers=text.num_hidden_layers, emulated=args.emulated)
    emit(record)


def _device_name(engine: Any) -> str:
    if isinstance(engine, TinyVLM):
        return engine.backend.device.name
    return engine.torch.cuda.get_device_name()


if __name__ == "__main__":
    main()
