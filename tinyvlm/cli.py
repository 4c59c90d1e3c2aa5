"""Command line: `python -m tinyvlm chat IMAGE`, `batch INPUT`, `serve`, `quantize SRC OUT` and `inspect PATH`.

Printing and exit codes only; no model logic. Heavy modules are imported inside the commands so that
`--help` stays instant. Every TinyVLMError becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Any, Sequence

from tinyvlm.errors import TinyVLMError
from tinyvlm.options import (DEFAULT_MODEL, default_model, generation, generation_arguments, load_model,
                             model_arguments)

USAGE_EXAMPLE = f"example: python -m tinyvlm chat photo.jpg --model {DEFAULT_MODEL} -p 'What is in the image?'"


COMMANDS = {  # the interactive chat's slash commands
    "/image PATH": "start over with a new image",
    "/clear": "forget the conversation (the image stays)",
    "/help": "list these commands",
    "/exit": "quit (also /quit, Ctrl-D)",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinyvlm", description="MobileVLM in NumPy.", epilog=USAGE_EXAMPLE)
    sub = p.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="ask about an image, once (-p) or interactively", epilog=USAGE_EXAMPLE)
    chat.add_argument("image", nargs="?", help="image file (optional for text-only models)")
    generation_arguments(chat, ("-p", "--prompt"), "answer this question once and exit")
    model_arguments(chat)
    chat.add_argument("--verbose", action="store_true", help="print timings and peak memory")

    batch = sub.add_parser("batch", help="ask about every image of a folder or list, into a resumable JSONL file")
    batch.add_argument("input", help="a folder of images, a text file of image paths, or a JSONL with image/prompt")
    batch.add_argument("--out", required=True, help="the JSONL output; a rerun skips what it already holds")
    batch.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                       help="run on Ray Data: a cluster's address, or none for a local one (the [ray] extra)")
    batch.add_argument("--ray-actors", type=int, default=2, help="model copies on Ray (default %(default)s)")
    batch.add_argument("--ray-actor-cpus", type=float, default=0.5, help="CPUs each asks for (default %(default)s)")
    batch.add_argument("--json", action="store_true", help="answers constrained to a JSON object")
    batch.add_argument("--json-schema", help="a file with a JSON schema the answers follow (json_grammar.py's subset)")
    generation_arguments(batch, ("--prompt",), "the question for every image (a JSONL line's own prompt wins)")
    model_arguments(batch)

    serve = sub.add_parser("serve", help="serve one model over an OpenAI-compatible HTTP API")
    serve.add_argument("--host", default="127.0.0.1", help="default %(default)s (this machine only)")
    serve.add_argument("--port", type=int, default=8080, help="default %(default)s")
    serve.add_argument("--api-key", help="require Authorization: Bearer KEY (default: $TINYVLM_API_KEY, else none)")
    serve.add_argument("--max-queue", type=int, default=8, help="requests admitted at once (default %(default)s)")
    serve.add_argument("--allowed-media-path", help="folder whose image files requests may name by path")
    serve.add_argument("--allow-remote-media", action="store_true", help="let requests name http(s) image URLs")
    serve.add_argument("--max-body-mb", type=float, default=32, help="largest request body (default %(default)s)")
    serve.add_argument("--alias", help="the model's name in the API (default: --model as given)")
    model_arguments(serve)

    quantize = sub.add_parser("quantize", help="write a quantized copy of a model that loads by memory map")
    quantize.add_argument("src", help="model directory or Hugging Face id")
    quantize.add_argument("out", help="new output directory")
    quantize.add_argument("--quant", choices=["int4", "int8"], required=True)

    inspect = sub.add_parser("inspect", help="print a model's config and a table of its tensors")
    inspect.add_argument("path", help="model directory, Hugging Face id, or weight file")
    return p


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
    from tinyvlm.processor import load_image

    gen = generation(args)  # bad flags fail before the slow load
    image = load_image(args.image) if args.image else None
    vlm = load_model(args)
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


def cmd_batch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tinyvlm import batch

    gen = generation(args)
    response_format = batch.response_format(args.json, args.json_schema)
    out = Path(args.out)
    todo = list(batch.pending(batch.items(args.input, args.prompt), out))  # bad input fails before the load
    if not todo:
        print(f"tinyvlm: nothing to do: {out} already answers every image", file=sys.stderr)
        return 0
    if args.ray is not None:
        return _batch_on_ray(args, todo, out, gen, response_format)
    answer = batch.answerer(load_model(args), {**gen, "system": args.system, "response_format": response_format})
    writer = batch.Writer(out)
    try:
        counts = batch.run(answer, todo, writer, batch.console_progress)
    finally:
        writer.close()
    print(f"tinyvlm: {counts['answered']} answered, {counts['failed']} failed, into {out}", file=sys.stderr)
    return 0


def _batch_on_ray(args: argparse.Namespace, todo: list, out: Any, gen: dict[str, Any],
                  response_format: dict[str, Any] | None) -> int:
    from tinyvlm import batch, batch_ray

    options = dict(path_or_repo_id=args.model or default_model(args.offline), quant=args.quant, backend=args.backend,
                   vision_tower=args.vision_tower, mmproj=args.mmproj, decode_activations=args.decode_activations,
                   vision_weights=args.vision_weights, offline=args.offline)
    writer = batch.Writer(out)
    try:
        counts = batch_ray.run(args.ray or None, todo, writer, options,
                               {**gen, "system": args.system, "response_format": response_format}, args.ray_actors,
                               args.ray_actor_cpus, batch.console_progress)
    finally:
        writer.close()
    print(f"tinyvlm: {counts['answered']} answered, {counts['failed']} failed, into {out} (on Ray)", file=sys.stderr)
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
    args.model = args.model or default_model(args.offline)
    model_id = args.alias or args.model
    try:
        server = Server(lambda: load_model(args, progress=False), model_id, args.host, args.port,
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
        if args.command == "batch":
            return cmd_batch(args)
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
