"""Command line: `python -m tinyvlm chat IMAGE` and `python -m tinyvlm inspect PATH`.

Printing and exit codes only; no model logic. Heavy modules are imported inside the commands so that
`--help` stays instant. Every TinyVLMError becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, Sequence

from tinyvlm.errors import ModelNotFound, TinyVLMError

DEFAULT_MODEL = "mtgv/MobileVLM_V2-1.7B"  # what `chat` runs when nothing names a model and none is cached
USAGE_EXAMPLE = f"example: python -m tinyvlm chat photo.jpg --model {DEFAULT_MODEL} -p 'What is in the image?'"


COMMANDS = {  # the interactive chat's slash commands
    "/image PATH": "start over with a new image",
    "/clear": "forget the conversation (the image stays)",
    "/help": "list these commands",
    "/exit": "quit (also /quit, Ctrl-D)",
}


def _parser() -> argparse.ArgumentParser:
    from tinyvlm.config import GenerationConfig

    defaults = GenerationConfig()
    DEFAULTS = {f: getattr(defaults, f) for f in vars(defaults)}
    p = argparse.ArgumentParser(prog="tinyvlm", description="MobileVLM in NumPy.", epilog=USAGE_EXAMPLE)
    sub = p.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="ask about an image, once (-p) or interactively", epilog=USAGE_EXAMPLE)
    chat.add_argument("image", nargs="?", help="image file (optional for text-only models)")
    chat.add_argument("-p", "--prompt", help="answer this question once and exit")
    chat.add_argument("--system", help="system prompt (default: the MobileVLM v1 one)")
    chat.add_argument("--max-tokens", type=int, default=DEFAULTS["max_new_tokens"], help="default %(default)s")
    chat.add_argument("--temperature", type=float, default=DEFAULTS["temperature"], help="0 = greedy (default)")
    chat.add_argument("--top-p", type=float, default=DEFAULTS["top_p"], help="default %(default)s")
    chat.add_argument("--top-k", type=int, default=DEFAULTS["top_k"], help="0 = off (default)")
    chat.add_argument("--repetition-penalty", type=float, default=DEFAULTS["repetition_penalty"],
                      help="default %(default)s")
    chat.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="random seed for sampling")
    _model_arguments(chat)
    chat.add_argument("--verbose", action="store_true", help="print timings and peak memory")

    serve = sub.add_parser("serve", help="serve one model over an OpenAI-compatible HTTP API")
    serve.add_argument("--host", default="127.0.0.1", help="default %(default)s (this machine only)")
    serve.add_argument("--port", type=int, default=8080, help="default %(default)s")
    serve.add_argument("--api-key", help="require Authorization: Bearer KEY (default: $TINYVLM_API_KEY, else none)")
    serve.add_argument("--max-queue", type=int, default=8, help="requests admitted at once (default %(default)s)")
    serve.add_argument("--allowed-media-path", help="folder whose image files requests may name by path")
    serve.add_argument("--allow-remote-media", action="store_true", help="let requests name http(s) image URLs")
    serve.add_argument("--max-body-mb", type=float, default=32, help="largest request body (default %(default)s)")
    serve.add_argument("--alias", help="the model's name in the API (default: --model as given)")
    _model_arguments(serve)

    quantize = sub.add_parser("quantize", help="write a quantized copy of a model that loads by memory map")
    quantize.add_argument("src", help="model directory or Hugging Face id")
    quantize.add_argument("out", help="new output directory")
    quantize.add_argument("--quant", choices=["int4", "int8"], required=True)

    inspect = sub.add_parser("inspect", help="print a model's config and a table of its tensors")
    inspect.add_argument("path", help="model directory, Hugging Face id, or weight file")
    return p


def _model_arguments(p: argparse.ArgumentParser) -> None:
    """The options that say which model to load and how (chat and serve)."""
    p.add_argument("--model", help="model directory or Hugging Face id, downloaded on first use (default: "
                   f"$TINYVLM_MODEL, else the first MobileVLM in the Hugging Face cache, else {DEFAULT_MODEL})")
    p.add_argument("--offline", action="store_true", default=None,
                   help="never touch the network: only models already on disk (also: HF_HUB_OFFLINE=1)")
    p.add_argument("--vision-tower", help="CLIP directory or id to use instead of the one the config names")
    p.add_argument("--mmproj", help="llama.cpp's image encoder GGUF, with an LLM .gguf as --model")
    p.add_argument("--quant", choices=["int4", "int8"], help="quantize the LLM's linear layers while loading")
    p.add_argument("--backend", choices=["numpy", "numba", "cuda"],
                   help="default: $TINYVLM_BACKEND, else numba when it is installed")
    p.add_argument("--threads", type=int, help="threads for the Numba kernels (default: all cores)")
    p.add_argument("--decode-activations", choices=["int8", "float32"],
                   help="one token's activations before a quantized matrix (default: int8, as llama.cpp)")
    p.add_argument("--vision-weights", choices=["float32", "int8"],
                   help="the vision tower's linear weights (default: float32; int8: a quarter of the memory)")
    p.add_argument("--image-cache", type=int, default=8,
                   help="images whose encodings are kept, so that asking again skips the vision tower "
                   "(default %(default)s; 0: off)")


def _load_model(args: argparse.Namespace, progress: bool = True) -> Any:
    """The model the arguments name, with its image cache sized."""
    from tinyvlm.image_cache import ImageCache
    from tinyvlm.loading import load

    cache = ImageCache(args.image_cache)  # a bad size fails before the slow load
    vlm = load(args.model or _default_model(args.offline), quant=args.quant, backend=args.backend,
               threads=args.threads, vision_tower=args.vision_tower, progress=progress, mmproj=args.mmproj,
               decode_activations=args.decode_activations, vision_weights=args.vision_weights, offline=args.offline)
    if vlm.quant_report is not None:
        print(f"quantized {vlm.quant_report}", file=sys.stderr)
    vlm.image_cache = cache
    return vlm


def _default_model(offline: bool | None) -> str:
    """$TINYVLM_MODEL, else the first MobileVLM in the cache, else DEFAULT_MODEL (downloaded) unless offline."""
    from tinyvlm.loading.download import offline as is_offline
    from tinyvlm.loading.hub import find_cached_models

    env = os.environ.get("TINYVLM_MODEL")
    if env:
        return env
    cached = find_cached_models()
    if cached:
        return cached[0]
    if not is_offline(offline):
        return DEFAULT_MODEL
    raise ModelNotFound(
        "no model given and none found (offline): pass --model PATH_OR_ID, set TINYVLM_MODEL, or download one "
        f"(e.g. `huggingface-cli download {DEFAULT_MODEL}`)"
    )


def _print_stats(vlm: Any) -> None:
    from tinyvlm.vlm import peak_rss_mib

    s = vlm.stats
    parts = [] if s.image_encode_s is None else [f"image encode {s.image_encode_s * 1000:.0f} ms"]
    if s.prefill_tokens:
        parts.append(f"prefill {s.prefill_tokens} tok at {s.prefill_tok_s:.1f} tok/s")
    if s.decode_tokens:
        parts.append(f"decode {s.decode_tokens} tok at {s.decode_tok_s:.1f} tok/s")
    parts.append(f"peak RSS {peak_rss_mib():.0f} MiB")
    print(f"[{' | '.join(parts)}]", file=sys.stderr)


def _stream(chat: Any, question: str, gen: dict[str, Any], verbose: bool) -> None:
    pieces = chat.send(question, stream=True, **gen)
    try:
        for piece in pieces:
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        print(" [stopped]", end="")
    finally:
        pieces.close()  # closes the turn: the rest of the reply and </s> go into the KV cache
    print()
    if verbose:
        _print_stats(chat.vlm)


def cmd_chat(args: argparse.Namespace) -> int:
    from tinyvlm.config import GenerationConfig
    from tinyvlm.processor import load_image

    gen = dict(
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    GenerationConfig(**gen)  # bad flags fail before the slow load
    image = load_image(args.image) if args.image else None
    vlm = _load_model(args)
    if image is not None and vlm.vision is None:
        raise TinyVLMError(f"{vlm.path}: a text-only model; run it without an image")
    chat = vlm.chat(image=image, system=args.system)
    if args.prompt is not None:
        _stream(chat, args.prompt, gen, args.verbose)
        return 0
    print("chat: /help lists the commands; Ctrl-C stops a reply", file=sys.stderr)
    while True:
        try:
            line = input(">>> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/clear":
            chat.clear()
            continue
        if line == "/help":
            print("\n".join(f"  {command:<12} {what}" for command, what in COMMANDS.items()), file=sys.stderr)
            continue
        if line.split()[0] == "/image":
            path = line[len("/image"):].strip()
            try:
                if not path:
                    raise TinyVLMError("/image needs a path: /image PATH")
                chat.clear(image=load_image(path))
            except TinyVLMError as e:
                print(f"tinyvlm: {e}", file=sys.stderr)
            continue
        if re.fullmatch(r"/\w+", line.split()[0]):  # a /word that is none of the commands
            print(f"tinyvlm: unknown command {line.split()[0]}; /help lists the commands (the conversation is "
                  "unchanged)", file=sys.stderr)
            continue
        try:
            _stream(chat, line, gen, args.verbose)
        except TinyVLMError as e:
            print(f"tinyvlm: {e}", file=sys.stderr)


def cmd_quantize(args: argparse.Namespace) -> int:
    from tinyvlm.loading import console_progress
    from tinyvlm.loading.hf import quantize_dir

    report = quantize_dir(args.src, args.out, args.quant, progress=console_progress)
    print(f"wrote {args.out}: {report}")
    return 0


def _inspect_gguf(path: object) -> int:
    """A GGUF file's metadata (long arrays summarised) and its tensors as stored (ggml type, our shape order)."""
    from tinyvlm.limits import short, shown
    from tinyvlm.weights.gguf import read_gguf

    f = read_gguf(path)  # type: ignore[arg-type]
    print(f"GGUF v{f.version}, {len(f.metadata)} metadata keys, {len(f.tensors)} tensors")
    for key, value in f.metadata.items():
        value_text = f"[{len(value)} values]" if isinstance(value, list) and len(value) > 8 else short(value)
        print(f"{shown(key)} = {value_text}")
    width = min(max((len(n) for n in f.tensors), default=4), 60)
    for name, t in f.tensors.items():
        print(f"{shown(name):<{width}}  {t.type_name:<5}  {list(t.shape)}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from tinyvlm.errors import ConfigError
    from tinyvlm.limits import read_json_object, shown
    from tinyvlm.loading.gguf import is_gguf
    from tinyvlm.loading.hub import resolve_model
    from tinyvlm.weights import open_checkpoint, open_file

    path = Path(args.path)
    if is_gguf(path):
        return _inspect_gguf(path)
    if path.is_file():
        store = open_file(path)
    else:
        model_dir = resolve_model(args.path)
        if (model_dir / "config.json").is_file():
            print(json.dumps(read_json_object(model_dir / "config.json", ConfigError), indent=2, sort_keys=True))
        store = open_checkpoint(model_dir)
    names = store.names()
    width = min(max((len(n) for n in names), default=4), 60)
    print(f"{'name':<{width}}  {'dtype':<5}  shape")
    total = 0
    for n in names:
        shape = store.shape(n)
        count = 1
        for d in shape:
            count *= d
        total += count
        print(f"{shown(n):<{width}}  {store.dtype(n):<5}  {list(shape)}")
    print(f"{len(names)} tensors, {total:,} values")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tinyvlm.image_cache import ImageCache
    from tinyvlm.openai_api import Media, api_key_from_env
    from tinyvlm.server import Server

    ImageCache(args.image_cache)
    if args.max_queue < 1 or not 0 < args.max_body_mb <= 1024:
        raise TinyVLMError("--max-queue must be at least 1 and --max-body-mb between 0 and 1024")
    media_dir = Path(args.allowed_media_path) if args.allowed_media_path else None
    if media_dir is not None and not media_dir.is_dir():
        raise TinyVLMError(f"--allowed-media-path {args.allowed_media_path}: not a directory")
    args.model = args.model or _default_model(args.offline)
    model_id = args.alias or args.model
    try:
        server = Server(lambda: _load_model(args, progress=False), model_id, args.host, args.port,
                        args.api_key or api_key_from_env(), args.max_queue, Media(media_dir, args.allow_remote_media),
                        int(args.max_body_mb * 2**20))
    except OSError as e:
        raise TinyVLMError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    server.load_in_background()
    print(f"tinyvlm: serving {model_id} on {server.url} (loading; /health says when it is ready)", file=sys.stderr)
    server.serve_forever()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "chat":
            return cmd_chat(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "quantize":
            return cmd_quantize(args)
        return cmd_inspect(args)
    except TinyVLMError as e:
        print(f"tinyvlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
