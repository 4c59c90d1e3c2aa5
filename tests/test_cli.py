"""The command line and every bad input of the first issue: one clear line on stderr, exit code 2, no traceback."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, stdin: str = "", env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "tinyvlm", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=full_env)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("\rloading")]
    errors = [ln for ln in lines if "error:" in ln]
    assert len(errors) == 1, proc.stderr
    for n in needles:
        assert n in errors[0], errors[0]


def test_help_imports_neither_torch_nor_numba():
    code = ("import sys, runpy; sys.argv=['tinyvlm','--help']\n"
            "try:\n    runpy.run_module('tinyvlm', run_name='__main__')\nexcept SystemExit: pass\n"
            "bad=[m for m in ('torch','numba','cupy','transformers') if m in sys.modules]\n"
            "print('HEAVY', bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "usage: tinyvlm" in out.stdout
    assert "HEAVY []" in out.stdout


def test_chat_once_with_prompt(checkpoints, shared_data):
    ref = checkpoints["v2"]
    proc = run_cli("chat", str(shared_data / "images" / "test-1.jpeg"), "--model", str(ref.path),
                   "-p", "What is in the image?", "--max-tokens", "8", "--verbose")
    assert proc.returncode == 0, proc.stderr
    import tinyvlm

    vlm = tinyvlm.load(ref.path)
    expected = vlm.generate("What is in the image?", image=shared_data / "images" / "test-1.jpeg", max_new_tokens=8)
    assert proc.stdout.strip() == expected
    assert "decode" in proc.stderr and "peak RSS" in proc.stderr and "image encode" in proc.stderr


def test_interactive_chat_commands(checkpoints, shared_data):
    ref = checkpoints["v2"]
    script = "Hello\n/clear\n/image /no/such.png\n/image " + str(shared_data / "images" / "test-1.jpeg") + "\nHi\n/exit\n"
    proc = run_cli("chat", str(shared_data / "images" / "test-1.jpeg"), "--model", str(ref.path),
                   "--max-tokens", "4", stdin=script)
    assert proc.returncode == 0, proc.stderr
    assert "/no/such.png" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.count(">>> ") >= 5


def test_default_model_from_env(checkpoints):
    ref = checkpoints["text"]
    proc = run_cli("chat", "-p", "Hi", "--max-tokens", "3", env={"TINYVLM_MODEL": str(ref.path)})
    assert proc.returncode == 0, proc.stderr


def test_inspect(checkpoints):
    proc = run_cli("inspect", str(checkpoints["v2"].path))
    assert proc.returncode == 0, proc.stderr
    assert '"mm_projector_type": "ldpnetv2"' in proc.stdout
    assert "model.mm_projector.peg.peg.0.weight" in proc.stdout and "BF16" in proc.stdout


# ------------------------------------------------------------------ bad input


@pytest.fixture()
def broken(tmp_path, checkpoints):
    """A writable copy of the tiny V2 checkpoint to break in different ways."""
    def make(name: str = "v2") -> Path:
        dst = tmp_path / name
        shutil.copytree(checkpoints[name].path, dst)
        return dst
    return make


def chat_once(model: Path | str, image: str | None = None, prompt: str = "Hi") -> subprocess.CompletedProcess:
    args = ["chat"] + ([image] if image else []) + ["--model", str(model), "-p", prompt, "--max-tokens", "2"]
    return run_cli(*args)


def test_missing_directory(tmp_path):
    assert_one_line_error(chat_once(tmp_path / "nope"), str(tmp_path / "nope"))


@pytest.mark.parametrize("name, data, needle", [
    ("model.gguf", b"GGUX\x03\x00\x00\x00" + bytes(64), "not a GGUF file or a known weight format (first bytes: 47 47"),
    ("config.json", b'{"hidden_size": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "JSON nested too deep"),
])
def test_hostile_file_is_one_line(tmp_path, name, data, needle):
    """A hostile file: exit 2 and one line naming it, not a traceback (tests/test_fuzz.py runs thousands)."""
    (tmp_path / name).write_bytes(data)
    model = tmp_path / name if name.endswith(".gguf") else tmp_path
    assert_one_line_error(chat_once(model), str(tmp_path / name), needle)


def test_missing_hub_id_says_where_it_looked(tmp_path):
    proc = run_cli("chat", "--model", "mtgv/MobileVLM_V2-1.7B", "-p", "x", env={"HF_HUB_CACHE": str(tmp_path)})
    assert_one_line_error(proc, "mtgv/MobileVLM_V2-1.7B", str(tmp_path))


def test_no_model_at_all(tmp_path):
    proc = run_cli("chat", "-p", "x", env={"HF_HUB_CACHE": str(tmp_path), "TINYVLM_MODEL": ""})
    assert_one_line_error(proc, "--model")


def test_missing_weight_file(broken):
    d = broken()
    (d / "pytorch_model.bin").unlink()
    assert_one_line_error(chat_once(d), str(d))


def test_truncated_weight_file(broken):
    d = broken()
    data = (d / "pytorch_model.bin").read_bytes()
    (d / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    assert_one_line_error(chat_once(d), "pytorch_model.bin")


def test_shard_named_in_index_but_absent(broken):
    d = broken("v2-safetensors")
    (d / "model-00002-of-00002.safetensors").unlink()
    assert_one_line_error(chat_once(d), "model-00002-of-00002.safetensors")


def test_safetensors_header_that_lies(broken):
    d = broken("v2-safetensors")
    f = d / "model-00001-of-00002.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8: 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [s * 2 for s in header[name]["shape"]]
    text = json.dumps(header).encode()
    f.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    assert_one_line_error(chat_once(d), "model-00001-of-00002.safetensors")


def test_unknown_projector_type(broken):
    d = broken()
    cfg = json.loads((d / "config.json").read_text())
    cfg["mm_projector_type"] = "qformer"
    (d / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(chat_once(d), "qformer", "config.json")


def test_missing_tokenizer(broken):
    d = broken()
    (d / "tokenizer.model").unlink()
    assert_one_line_error(chat_once(d), "tokenizer", str(d))


def test_mis_shaped_and_missing_tensors_listed_together(broken):
    import torch

    d = broken("text")
    state = torch.load(d / "pytorch_model.bin", weights_only=True)
    del state["model.norm.weight"]
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:10]
    state["model.extra.weight"] = torch.zeros(3)
    torch.save(state, d / "pytorch_model.bin")
    proc = chat_once(d)
    assert_one_line_error(proc, "model.norm.weight", "model.layers.0.mlp.up_proj.weight", "model.extra.weight")


def test_not_an_image(checkpoints, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not a picture")
    assert_one_line_error(chat_once(checkpoints["v2"].path, str(bad)), str(bad))


def test_missing_image(checkpoints, tmp_path):
    assert_one_line_error(chat_once(checkpoints["v2"].path, str(tmp_path / "none.png")), "none.png")


@pytest.mark.parametrize("size", [(1, 1), (0, 5)])
def test_tiny_images(checkpoints, tmp_path, size):
    from PIL import Image

    path = tmp_path / f"tiny{size[0]}x{size[1]}.png"
    if size[0] == 0:  # PIL cannot save a zero-sized image: write a PNG header that claims width 0
        Image.new("RGB", (1, 5)).save(path)
        raw = bytearray(path.read_bytes())
        raw[16:20] = (0).to_bytes(4, "big")
        path.write_bytes(bytes(raw))
    else:
        Image.new("RGB", size).save(path)
    assert_one_line_error(chat_once(checkpoints["v2"].path, str(path)), path.name)


def test_prompt_longer_than_context(checkpoints):
    assert_one_line_error(chat_once(checkpoints["text"].path, prompt="word " * 700), "context")


def test_bad_generation_flag(checkpoints):
    proc = run_cli("chat", "--model", str(checkpoints["text"].path), "-p", "x", "--temperature", "-1")
    assert_one_line_error(proc, "temperature")


def test_image_given_to_text_only_model(checkpoints, shared_data):
    proc = chat_once(checkpoints["text"].path, str(shared_data / "images" / "test-1.jpeg"))
    assert_one_line_error(proc, "text-only")


def test_quantize_then_chat(checkpoints, shared_data, tmp_path):
    out = tmp_path / "v2-int4"
    proc = run_cli("quantize", str(checkpoints["v2"].path), str(out), "--quant", "int4")
    assert proc.returncode == 0, proc.stderr
    assert "relative error" in proc.stdout
    image = str(shared_data / "images" / "test-1.jpeg")
    quantized = run_cli("chat", image, "--model", str(out), "-p", "Hi", "--max-tokens", "6", "--threads", "1")
    at_load = run_cli("chat", image, "--model", str(checkpoints["v2"].path), "--quant", "int4", "-p", "Hi",
                      "--max-tokens", "6")
    assert quantized.returncode == 0 and at_load.returncode == 0, quantized.stderr + at_load.stderr
    assert quantized.stdout == at_load.stdout
    again = run_cli("quantize", str(checkpoints["v2"].path), str(out), "--quant", "int4")
    assert_one_line_error(again, "already exists")
    assert not (tmp_path / "v2-int4.partial").exists()


def test_inspect_gguf():
    from tests.conftest import smollm2_path

    proc = run_cli("inspect", str(smollm2_path()))
    assert proc.returncode == 0, proc.stderr
    assert "general.architecture = 'llama'" in proc.stdout
    assert "blk.0.attn_q.weight" in proc.stdout and "Q4_1" in proc.stdout and "[576, 576]" in proc.stdout


def test_help_and_unknown_commands_leave_the_conversation_alone(checkpoints):
    ref = checkpoints["text"]
    proc = run_cli("chat", "--model", str(ref.path), "--max-tokens", "6",
                   stdin="/help\n/summarize\n/image\nHello\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    assert "/image PATH" in proc.stderr and "/clear" in proc.stderr and "/exit" in proc.stderr  # the /help list
    assert "unknown command /summarize; /help lists the commands" in proc.stderr
    assert "/image needs a path" in proc.stderr
    import tinyvlm

    expected = tinyvlm.load(ref.path).chat().send("Hello", max_new_tokens=6)
    answers = [part.strip() for part in proc.stdout.split(">>> ") if part.strip()]
    assert answers == [expected]  # only "Hello" reached the model, as the first turn


def test_verbose_prints_only_what_happened(checkpoints, shared_data, backend_name):
    text = run_cli("chat", "--model", str(checkpoints["text"].path), "-p", "Hi", "--max-tokens", "4", "--verbose")
    assert text.returncode == 0, text.stderr
    stats = [ln for ln in text.stderr.splitlines() if ln.startswith("[")][-1]
    assert "image encode" not in stats and "prefill" in stats and "peak RSS" in stats
    assert ("compiling kernels" in text.stderr) == (backend_name == "numba")  # at load, not at the first answer
    image = run_cli("chat", str(shared_data / "images" / "test-1.jpeg"), "--model", str(checkpoints["v2"].path),
                    "-p", "Hi", "--max-tokens", "4", "--verbose")
    assert "image encode" in [ln for ln in image.stderr.splitlines() if ln.startswith("[")][-1]


def test_backend_flag(checkpoints):
    proc = run_cli("chat", "--model", str(checkpoints["text"].path), "-p", "Hi", "--max-tokens", "2",
                   "--backend", "numpy", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert "compiling kernels" not in proc.stderr
    assert run_cli("chat", "--model", str(checkpoints["text"].path), "--backend", "cuda").returncode == 2
    assert_one_line_error(run_cli("chat", "--model", str(checkpoints["text"].path), "-p", "Hi", "--threads", "0"),
                          "threads must be")
