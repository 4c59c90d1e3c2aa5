"""LLM prefill and decode speed at MobileLLaMA-1.4B shapes (random weights), one engine per run; or the read ceiling.

Engines: tinyvlm (`--quant fp32 | int8 | int4`), llama.cpp through llama-cpp-python (`--gguf q4_0`: a Q4_0 GGUF written
here with the `gguf` package; `--gguf q4_k_m`: the same weights made Q4_K_M by llama.cpp's own quantizer),
tinyvlm-gguf (tinyvlm loading that same file), PyTorch + transformers (`LlamaForCausalLM`, fp32), and `bandwidth`: the
memory read ceiling (a large float32 array summed by 1..n threads) that decode speed is judged against.
Every engine gets the same protocol: prefill a random prompt on an empty cache, then decode greedily one token at a
time after it (the argmax of each step's logits is the next input), so decode runs at context prefill .. prefill+N.
One warm-up round first (JIT, lazy allocation), then `--repeat` timed rounds; medians are reported.
Prints one JSON line. Run: `python benchmarks/bench_llm.py --engine tinyvlm --quant int4 --threads 2`.
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from _common import (DEFAULT_CACHE, TEXT, TOKENIZER, decode_weight_bytes, emit, llm_matrix_params, median, nbytes,
                     peak_rss_mib, pin_threads, prompt_ids, random_weights, reset_peak_rss)

SHAPES = "MobileLLaMA-1.4B D=2048 L=24 H=16 F=5632 V=32000"
WARMUP_PROMPT, WARMUP_STEPS = 8, 2


class Engine(Protocol):
    weight_bytes: int  # bytes of the matrices read per decoded token (embedding table excluded)

    def prefill(self, ids: list[int]) -> int:
        """Run the prompt on an empty cache; return the greedy next token."""

    def step(self, token: int) -> int:
        """Run one token after the cache; return the greedy next token."""


# ---------------------------------------------------------------- tinyvlm

class TinyVLM:
    def __init__(self, quant: str, threads: int, decode_activations: str = "int8") -> None:
        from tinyvlm.backends import make
        from tinyvlm.language import LanguageModel, language_expected_shapes

        quantizer = load_quantizer(quant)
        weights = random_weights(language_expected_shapes(TEXT), np.random.default_rng(0))
        if quantizer is not None:
            weights, _report = quantizer(TEXT, weights, quant)  # rebinding drops the fp32 dict
        self.weight_bytes = decode_weight_bytes(weights)
        self.lm = LanguageModel(TEXT, weights, make(threads=threads, decode_activations=decode_activations))
        self.cache = self.lm.new_cache()

    def prefill(self, ids: list[int]) -> int:
        self.cache.reset()  # allocated once, as Chat does and as llama.cpp's context is (llm.reset() below)
        return int(np.argmax(self.lm.forward(self.lm.embed(ids), self.cache)))

    def step(self, token: int) -> int:
        return int(np.argmax(self.lm.forward(self.lm.embed([token]), self.cache)))


class TinyVLMGGUF(TinyVLM):
    """tinyvlm running llama.cpp's file (the one the llama.cpp engine reads with the same --gguf)."""

    def __init__(self, path: Path, threads: int, decode_activations: str = "int8") -> None:
        import tinyvlm

        self.lm = tinyvlm.load(path, threads=threads, decode_activations=decode_activations).language
        layers = [(layer.qkv, layer.o_proj, layer.gate_up, layer.down_proj) for layer in self.lm.layers]
        self.weight_bytes = nbytes(layers) + nbytes(self.lm.lm_head)  # as tinyvlm holds them, not the file's
        self.cache = self.lm.new_cache()


def load_quantizer(quant: str) -> Any:
    """tinyvlm's `quantize_language` (issue 3 section 1) for int8/int4, None for fp32; checked before any work."""
    if quant == "fp32":
        return None
    try:
        from tinyvlm.quantize import quantize_language
    except ImportError as e:
        raise Unavailable(f"tinyvlm {quant} is not available yet (tinyvlm.quantize: {e})") from None
    return quantize_language


# ---------------------------------------------------------------- llama.cpp

class LlamaCpp:
    def __init__(self, threads: int, path: Path, extra_buffers: bool) -> None:
        import llama_cpp

        self.weight_bytes = gguf_decode_bytes(path)
        self.llama_cpp = llama_cpp
        self.settings = dict(n_threads=threads, n_threads_batch=threads, n_ctx=TEXT.max_position_embeddings,
                             n_batch=512)
        with _model_params(llama_cpp, extra_buffers):
            self.llm = llama_cpp.Llama(model_path=str(path), verbose=False, **self.settings)
        self.settings["use_extra_bufts"] = extra_buffers

    def _next(self) -> int:
        """Greedy token from the logits of the last evaluated position (llama-cpp-python keeps no copy of them)."""
        logits = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(TEXT.vocab_size,))))

    def prefill(self, ids: list[int]) -> int:
        self.llm.reset()  # the next eval drops the KV cache from position 0 on
        self.llm.eval(ids)
        return self._next()

    def step(self, token: int) -> int:
        self.llm.eval([token])
        return self._next()


def llamacpp_build(llama_cpp: Any) -> dict[str, Any]:
    """What llama.cpp ran with, for every row: the package version and the CPU features its build enabled."""
    info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    return {"llamacpp_version": llama_cpp.__version__, "llamacpp_system_info": info}


@contextmanager
def _model_params(llama_cpp: Any, extra_buffers: bool) -> Iterator[None]:
    """Let `Llama` load with llama.cpp's extra buffer types (AMX, CPU repack) on or off.

    On by default: llama.cpp at its best, with its AVX-512 repack of Q4_0 weights. The build must then be one
    without AMX (see README.md: a native build's AMX path dies with "Illegal instruction" on the KVM guests here,
    ggml-org/llama.cpp#20824). `Llama()` has no argument for `use_extra_bufts`, so its default-params call is
    wrapped while the model loads; off, llama.cpp runs its plain Q4_0 x Q8_0 dot products.
    """
    module = llama_cpp.llama.llama_cpp  # the module whose llama_model_default_params Llama.__init__ calls
    default = module.llama_model_default_params

    def params() -> Any:
        p = default()
        p.use_extra_bufts = extra_buffers
        return p

    module.llama_model_default_params = params
    try:
        yield
    finally:
        module.llama_model_default_params = default


GGUF_NAMES = {"q4_0": "mobilellama-1.4b-random-q4_0-q8_0-output.gguf",
              "q4_k_m": "mobilellama-1.4b-random-q4_k_m-llamacpp.gguf"}
GGUF_LABELS = {"q4_0": "q4_0 (output q8_0)", "q4_k_m": "Q4_K_M (llama.cpp's quantizer, from F16)"}
LLAMA_FTYPE_MOSTLY_Q4_K_M = 15  # llama.h


def ensure_gguf(cache_dir: Path, kind: str) -> Path:
    """The random-weight GGUF at MobileLLaMA-1.4B shapes, written once into cache_dir: Q4_0 written by gguf-py,
    or Q4_K_M made by llama.cpp's own quantizer from the same weights in F16 (which needs llama-cpp-python)."""
    path = cache_dir / GGUF_NAMES[kind]
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        if kind == "q4_0":
            write_gguf(tmp, "Q4_0")
        else:
            import llama_cpp

            f16 = cache_dir / "mobilellama-1.4b-random-f16.partial"
            write_gguf(f16, "F16")
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.nthread = LLAMA_FTYPE_MOSTLY_Q4_K_M, os.cpu_count() or 1
            status = llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), params)
            f16.unlink()
            if status != 0:
                raise Unavailable(f"llama.cpp's quantizer failed (status {status})")
        tmp.rename(path)  # only a complete file ever has the final name
    return path


def write_gguf(path: Path, kind: str) -> None:
    """Every 2-D weight in `kind` (Q4_0, or F16 for llama.cpp's quantizer), output.weight Q8_0 (F16), norms F32;
    llama.cpp names and metadata; the SPM vocab's tokenizer.

    llama.cpp's own Q4_0 quantizer keeps output.weight at Q6_K, which gguf-py cannot write; Q8_0 (8.5 bits) stands
    in for it, so this file reads slightly more bytes per token than a real Q4_0 file (counted in weight_bytes).
    """
    import gguf

    Q = gguf.GGMLQuantizationType
    cfg, rng = TEXT, np.random.default_rng(0)
    D, F, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    q_out, kv_out = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim

    def matrix(rows: int, cols: int, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
        return gguf.quants.quantize(rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02), qtype)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("random weights at MobileLLaMA-1.4B shapes (tinyvlm benchmark)")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(D)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(V)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if kind == "Q4_0" else gguf.LlamaFileType.MOSTLY_F16)
    _copy_tokenizer(w, TOKENIZER.with_name("ggml-vocab-llama-spm.gguf"))

    ones = np.ones(D, np.float32)
    qtype = Q[kind]
    w.add_tensor("token_embd.weight", matrix(V, D, qtype), raw_dtype=qtype)
    for i in range(L):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", ones)
        for name, rows, cols in (("attn_q", q_out, D), ("attn_k", kv_out, D), ("attn_v", kv_out, D),
                                 ("attn_output", D, q_out), ("ffn_gate", F, D), ("ffn_up", F, D),
                                 ("ffn_down", D, F)):
            w.add_tensor(b + name + ".weight", matrix(rows, cols, qtype), raw_dtype=qtype)
        w.add_tensor(b + "ffn_norm.weight", ones)
    w.add_tensor("output_norm.weight", ones)
    out_type = Q.Q8_0 if kind == "Q4_0" else qtype
    w.add_tensor("output.weight", matrix(V, D, out_type), raw_dtype=out_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _copy_tokenizer(w: Any, vocab_path: Path) -> None:
    """Every tokenizer.ggml.* key of llama.cpp's LLaMA SPM vocab file, so llama.cpp accepts the model."""
    import gguf

    reader = gguf.GGUFReader(str(vocab_path))
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml."):
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), vtype, sub)


def gguf_decode_bytes(path: Path) -> int:
    """Bytes of the GGUF's matrices read per decoded token: all tensors but token_embd and the norms."""
    import gguf

    tensors = gguf.GGUFReader(str(path)).tensors
    return sum(int(t.n_bytes) for t in tensors if t.name != "token_embd.weight" and "norm" not in t.name)


# ---------------------------------------------------------------- PyTorch + transformers

class TransformersEngine:
    """prefill/step for a transformers causal LM: subclasses set self.torch and self.model; the KV cache is
    the model's own (past_key_values), dropped at each prefill."""

    torch: Any
    model: Any
    past: Any = None

    def _run(self, ids: list[int]) -> int:
        with self.torch.inference_mode():
            out = self.model(input_ids=self.torch.tensor([ids]), past_key_values=self.past, use_cache=True,
                             logits_to_keep=1)
        self.past = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def prefill(self, ids: list[int]) -> int:
        self.past = None
        return self._run(ids)

    def step(self, token: int) -> int:
        return self._run([token])


class Torch(TransformersEngine):
    def __init__(self, threads: int) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        cfg = TEXT
        config = LlamaConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                             num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                             num_key_value_heads=cfg.num_key_value_heads, vocab_size=cfg.vocab_size,
                             max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
                             rope_theta=cfg.rope_theta, tie_word_embeddings=False, dtype="float32")
        self.torch = torch
        self.model = LlamaForCausalLM(config).to(torch.float32).eval()
        self.weight_bytes = 4 * llm_matrix_params(cfg)


# ---------------------------------------------------------------- the read ceiling

def read_bandwidth(threads: int, gib: float, repeat: int) -> dict[str, Any]:
    """GB/s of reading a float32 array far larger than the last-level cache with `threads` threads, two ways.

    BLAS sgemv over the array viewed as (rows, 2048) is exactly fp32 decode's access pattern; a Numba parallel
    sum (when numba is installed) is the plainest streaming read. The ceiling is the faster of the two.
    """
    data = np.ones(int(gib * 2**30) // 4 // 2048 * 2048, np.float32)
    matrix, vector = data.reshape(-1, 2048), np.ones(2048, np.float32)
    readers: dict[str, Any] = {"blas_sgemv": lambda: matrix @ vector}
    try:
        import numba

        @numba.njit(parallel=True, fastmath=True)
        def parallel_sum(a: np.ndarray) -> float:
            total = np.float32(0.0)
            for i in numba.prange(a.shape[0]):
                total += a[i]
            return total

        numba.set_num_threads(threads)
        readers["numba_prange_sum"] = lambda: parallel_sum(data)
    except ImportError:
        pass
    record: dict[str, Any] = {"bench": "bandwidth", "engine": "read-ceiling", "threads": threads,
                              "array_gib": round(data.nbytes / 2**30, 2), "runs": repeat}
    for name, read in readers.items():
        read()  # compile, touch every page
        rates = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            read()
            rates.append(data.nbytes / (time.perf_counter() - t0) / 1e9)
        record[name + "_GB_s"] = max(rates)
    record["read_GB_s"] = max(record[name + "_GB_s"] for name in readers)
    return record


# ---------------------------------------------------------------- the protocol

class Unavailable(Exception):
    """The engine cannot run here (not installed, not written yet); reported as a JSON line, not a crash."""


def time_engine(engine: Engine, ids: list[int], decode_tokens: int, repeat: int) -> dict[str, Any]:
    tok = engine.prefill(ids[:WARMUP_PROMPT])
    for _ in range(WARMUP_STEPS):
        tok = engine.step(tok)
    prefill, decode = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        tok = engine.prefill(ids)
        prefill.append(len(ids) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            tok = engine.step(tok)
        decode.append(decode_tokens / (time.perf_counter() - t0))
    return {"prefill_tok_s": median(prefill), "decode_tok_s": median(decode),
            "prefill_tok_s_runs": [round(r, 2) for r in prefill], "decode_tok_s_runs": [round(r, 3) for r in decode]}


def build(args: argparse.Namespace) -> tuple[Engine, str]:
    """The engine and its weight format label."""
    if args.engine == "tinyvlm":
        return TinyVLM(args.quant, args.threads, args.decode_activations), args.quant
    if args.engine in ("llama.cpp", "tinyvlm-gguf"):
        try:
            import llama_cpp  # noqa: F401  (both read the file llama.cpp reads; Q4_K_M is made by its quantizer)
        except ImportError as e:
            raise Unavailable(f"llama-cpp-python is not installed ({e})") from None
        path = ensure_gguf(args.cache_dir, args.gguf)
        if args.engine == "tinyvlm-gguf":
            return TinyVLMGGUF(path, args.threads, args.decode_activations), GGUF_LABELS[args.gguf]
        engine = LlamaCpp(args.threads, path, not args.llamacpp_no_extra_buffers)
        return engine, GGUF_LABELS[args.gguf] + (", no extra buffer types" if args.llamacpp_no_extra_buffers else "")
    return Torch(args.threads), "fp32"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=("tinyvlm", "tinyvlm-gguf", "llama.cpp", "torch", "bandwidth"), required=True)
    ap.add_argument("--gguf", choices=tuple(GGUF_NAMES), default="q4_0",
                    help="the file llama.cpp and tinyvlm-gguf read (default q4_0)")
    ap.add_argument("--quant", choices=("fp32", "int8", "int4"), default="fp32", help="tinyvlm weight format")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-tokens", type=int, default=192)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds; medians are reported")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the GGUF is written once")
    ap.add_argument("--llamacpp-no-extra-buffers", action="store_true",
                    help="keep llama.cpp from repacking weights (its extra buffer types; on by default)")
    ap.add_argument("--decode-activations", choices=("int8", "float32"), default="int8",
                    help="tinyvlm: what one token (and short inputs) multiply quantized matrices in")
    ap.add_argument("--ceiling-gbs", type=float, help="read ceiling at these threads, for fraction_of_ceiling")
    ap.add_argument("--bandwidth-gib", type=float, default=2.0, help="array size for --engine bandwidth")
    args = ap.parse_args()
    pin_threads(args.threads)

    if args.engine == "bandwidth":
        emit(read_bandwidth(args.threads, args.bandwidth_gib, max(args.repeat, 5)))
        return
    record: dict[str, Any] = {"bench": "llm", "engine": args.engine, "threads": args.threads, "shapes": SHAPES}
    t0 = time.perf_counter()
    try:
        engine, quant = build(args)
    except Unavailable as e:
        emit({**record, "quant": args.quant, "error": str(e)})
        return
    record["quant"] = quant
    if isinstance(engine, LlamaCpp):
        record.update(llamacpp_build(engine.llama_cpp), llamacpp_settings=engine.settings)
    if isinstance(engine, TinyVLM):
        record["decode_activations"] = engine.lm.bk.decode_activations
    record["load_s"] = time.perf_counter() - t0
    record["load_peak_rss_mib"] = round(peak_rss_mib())
    reset_peak_rss()
    timing = time_engine(engine, prompt_ids(args.prefill_tokens), args.decode_tokens, args.repeat)
    gbs = engine.weight_bytes * timing["decode_tok_s"] / 1e9
    record.update(prefill_tokens=args.prefill_tokens, prefill_tok_s=timing["prefill_tok_s"],
                  decode_tokens=args.decode_tokens, decode_tok_s=timing["decode_tok_s"],
                  weight_bytes_per_token=engine.weight_bytes, effective_GB_s=gbs,
                  fraction_of_ceiling=gbs / args.ceiling_gbs if args.ceiling_gbs else None,
                  peak_rss_mib=round(peak_rss_mib()), runs=args.repeat,
                  prefill_tok_s_runs=timing["prefill_tok_s_runs"], decode_tok_s_runs=timing["decode_tok_s_runs"])
    emit(record)


if __name__ == "__main__":
    main()
