"""Fuzz tests: hostile or broken model files give a TinyVLMError (any kind) or a model that loads and generates;
never another exception, a hang, a memory blow-up, a crash, or code run from a weight file.

Seeds (tests/fuzz/seeds.py) are tiny models in every format tinyvlm reads; each case is a mutated copy
(tests/fuzz/mutate.py, edits.py), loaded and run for two greedy tokens in a capped child process
(tests/fuzz/runner.py: 4 GiB address space, a wall-clock timeout, a marker file that malicious pickles try to
create). Two kinds of tests:

* test_fuzz[family]: hypothesis draws mutations of one seed; outcome "ok" or "TinyVLMError...".
  $TINYVLM_FUZZ_EXAMPLES sets the examples per family (default 500: the whole file, seeds included, took 70-90 s
  on the 2-core development VM). `pytest --hypothesis-seed=N` replays a run; TINYVLM_FUZZ_SHRINK=1 shrinks a
  failure (slow when it hangs).
* test_hostile[case]: the named hostile files, each refused with a TinyVLMError ("refuse"), or at least never
  worse than one ("survive": ok or TinyVLMError, e.g. a huge context must not run out of memory).

Long runs: with TINYVLM_FUZZ_LOG=PATH every case appends {format, mutation, class, outcome, detail} to PATH as a JSON
line and test_fuzz does not stop at a failure; `python -m tests.fuzz.runner table PATH` prints format x outcome.
"""
from __future__ import annotations

import itertools
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.fuzz import formats as fm
from tests.fuzz import mutate
from tests.fuzz.edits import HOSTILE, Mutation, flip, gguf_edit, json_edit, pickle_edit, spm_edit, st_edit, zip_edit
from tests.fuzz.runner import Runner
from tests.fuzz.seeds import FAMILIES, Seed, build_all

BACKEND_FREE = True  # every model runs in the fuzz worker, on the numpy backend

EXAMPLES = int(os.environ.get("TINYVLM_FUZZ_EXAMPLES", "500"))
LOGGING = bool(os.environ.get("TINYVLM_FUZZ_LOG"))
SHRINK = bool(os.environ.get("TINYVLM_FUZZ_SHRINK"))
PHASES = [p for p in Phase if SHRINK or p not in (Phase.shrink, Phase.explain)]
REFUSE, SURVIVE = "refuse", "survive"
ST, CFG, LLM, MMPROJ = "model.safetensors", "config.json", "llm.gguf", "mmproj.gguf"
_counter = itertools.count()


class Seeds(dict):
    def __repr__(self) -> str:  # hypothesis prints the fixtures of a failing case
        return f"<fuzz seeds in {next(iter(self.values())).path.parent}>"


@pytest.fixture(scope="session")
def seeds(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, Seed]:
    return Seeds(build_all(tmp_path_factory.mktemp("fuzz-seeds")))


@pytest.fixture(scope="session")
def runner():
    r = Runner()
    yield r
    r.close()


@pytest.fixture(scope="session")
def cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-cases")


def run_mutation(runner: Runner, seed: Seed, m: Mutation, root: Path) -> str:
    """The outcome of loading (and generating with) the seed mutated by m; the copy is removed afterwards."""
    out = root / f"case{next(_counter)}"
    try:
        path, mmproj, marker = mutate.apply(seed, m, out)
        return runner.run(path, mmproj, marker, family=seed.family, mutation=m.kind, detail=m.what)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def acceptable(outcome: str) -> bool:
    return outcome == "ok" or outcome.startswith("TinyVLMError")


@pytest.mark.parametrize("family", FAMILIES)
def test_seed_loads_and_generates(family, seeds, runner):
    seed = seeds[family]
    assert runner.run(seed.path, seed.mmproj, family=family, mutation="none") == "ok"


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=EXAMPLES, deadline=None, phases=PHASES, suppress_health_check=list(HealthCheck),
          print_blob=True)
@given(data=st.data())
def test_fuzz(family, data, seeds, runner, cases):
    m = data.draw(mutate.mutations(seeds[family]), label="mutation")
    outcome = run_mutation(runner, seeds[family], m, cases)
    assert LOGGING or acceptable(outcome), f"{family}, {m!r}:\n{outcome}"


# ---------------------------------------------------------------- the named hostile cases

def both(a: Mutation, b: Mutation) -> Mutation:
    """Two edits of the same file, one after the other."""
    return Mutation(a.kind, a.file, lambda data, marker: b.edit(a.edit(data, marker), marker), f"{a.what}; {b.what}")


def context(raw: str) -> Mutation:
    """config.json's context (max_sequence_length, which wins, and max_position_embeddings) set to raw."""
    return both(json_edit(CFG, ("max_sequence_length",), raw), json_edit(CFG, ("max_position_embeddings",), raw))


def kv(name: str, key: str, t: int, value: object) -> Mutation:
    return gguf_edit(name, "kv", key, t, value)


EMBED = "model.embed_tokens.weight"
U32, U64, F32 = 4, 10, 6
HOSTILE_CASES = [
    # safetensors: the offsets must tile the data buffer exactly, as the reference reader demands
    ("st-overlapping-offsets", "safetensors", st_edit(ST, "overlap", 2), REFUSE),
    ("st-shifted-offsets", "safetensors", st_edit(ST, "shift", 2, 2), REFUSE),
    ("st-holey-offsets", "safetensors", st_edit(ST, "hole", 0, 16), REFUSE),
    ("st-trailing-bytes", "safetensors", st_edit(ST, "tail", 0, 16), REFUSE),
    ("st-bf16-relabelled-i16", "safetensors", st_edit(ST, "relabel", 2, "I16"), REFUSE),
    ("st-dtype-as-list", "safetensors", st_edit(ST, "dtype-list", 2), REFUSE),
    ("st-header-100k-deep", "safetensors", st_edit(ST, "json", 0, (("__metadata__",), HOSTILE["deep"])), REFUSE),
    ("st-header-5000-digit-int", "safetensors", st_edit(ST, "json", 0, ((EMBED, "shape", 0), "9" * 5000)), REFUSE),
    ("st-20000-extra-tensors", "safetensors", st_edit(ST, "many", 0, 20000), REFUSE),
    ("quantized-kinds-100k-deep", "quantized",
     st_edit(ST, "json", 0, (("__metadata__", "kinds"), '"' + HOSTILE["deep"] + '"')), REFUSE),
    ("index-shard-outside-the-dir", "sharded", json_edit("model.safetensors.index.json",
                                                         ("weight_map", "model.norm.weight"), '"../x"'), REFUSE),
    # config.json
    ("config-rms-norm-eps-nan", "safetensors", json_edit(CFG, ("rms_norm_eps",), "NaN"), REFUSE),
    ("config-rope-theta-0", "safetensors", json_edit(CFG, ("rope_theta",), "0"), REFUSE),
    ("config-num-attention-heads-0", "safetensors", json_edit(CFG, ("num_attention_heads",), "0"), REFUSE),
    ("config-num-hidden-layers-2**64", "safetensors", json_edit(CFG, ("num_hidden_layers",), str(2**64)), REFUSE),
    ("config-5000-digit-int", "safetensors", json_edit(CFG, ("hidden_size",), "9" * 5000), REFUSE),
    ("config-100k-deep", "safetensors", json_edit(CFG, ("hidden_size",), HOSTILE["deep"]), REFUSE),
    ("config-bos-token-id-infinity", "safetensors", json_edit(CFG, ("bos_token_id",), "Infinity"), REFUSE),
    ("config-max-position-embeddings-1e30", "safetensors", context("1e30"), REFUSE),
    ("config-context-2**31", "safetensors", context(str(2**31)), SURVIVE),
    ("config-context-2**40", "safetensors", context(str(2**40)), SURVIVE),
    ("v2-mm-hidden-size-[1]", "v2", json_edit(CFG, ("mm_hidden_size",), "[1]"), REFUSE),
    ("v2-mm-vision-select-layer-[]", "v2", json_edit(CFG, ("mm_vision_select_layer",), "[]"), REFUSE),
    ("v2-mm-vision-select-layer-infinity", "v2", json_edit(CFG, ("mm_vision_select_layer",), "Infinity"), REFUSE),
    ("v2-mm-vision-tower-5", "v2", json_edit(CFG, ("mm_vision_tower",), "5"), REFUSE),
    # a V2 model runs its stored tower: a named tower that cannot be a path is not an error
    ("v2-mm-vision-tower-300-chars", "v2", json_edit(CFG, ("mm_vision_tower",), '"' + "x" * 300 + '"'), SURVIVE),
    ("v2-mm-vision-tower-no-such-user", "v2", json_edit(CFG, ("mm_vision_tower",), '"~nosuchuser/x"'), SURVIVE),
    ("v2-select-feature-cls-patch", "v2", json_edit(CFG, ("mm_vision_select_feature",), '"cls_patch"'), REFUSE),
    ("index-shard-name-300-chars", "sharded", json_edit("model.safetensors.index.json",
                                                        ("weight_map", "model.norm.weight"), '"' + "x" * 300 + '"'),
     REFUSE),
    ("index-shard-name-newline", "sharded", json_edit("model.safetensors.index.json",
                                                      ("weight_map", "model.norm.weight"), '"a\\nb"'), REFUSE),
    ("tokenizer-json-model-5", "tokenizer-json", json_edit("tokenizer.json", ("model",), "5"), REFUSE),
    # tokenizer.model
    ("spm-unk-id-out-of-range", "safetensors", spm_edit("trainer", (40, 0, 10**6)), REFUSE),
    ("spm-eos-id-negative", "safetensors", spm_edit("trainer", (42, 0, -5)), REFUSE),
    ("spm-piece-length-lie", "safetensors", spm_edit("length-lie", 2**40, 5), REFUSE),
    ("spm-huge-piece", "safetensors", spm_edit("piece", (1, 2, b"a" * (1 << 20)), 300), SURVIVE),
    # pytorch_model.bin: the zip
    ("bin-member-name-not-utf8", "bin", zip_edit("not-utf8", "data.pkl"), REFUSE),
    ("bin-data.pkl-encrypted", "bin", zip_edit("encrypted", "data.pkl"), REFUSE),
    ("bin-data.pkl-unknown-compression", "bin", zip_edit("method", "data.pkl", 99), REFUSE),
    ("bin-no-data.pkl", "bin", zip_edit("missing", "data.pkl"), REFUSE),
    ("bin-data.pkl-deflate-bomb-2GiB", "bin", zip_edit("bomb", "data.pkl", 2048), SURVIVE),
    ("bin-storage-deflate-bomb-1GiB", "bin", zip_edit("bomb", "data/0", 1024), SURVIVE),
    ("bin-byteorder-deflate-bomb-2GiB", "bin", zip_edit("bomb", "byteorder", 2048), SURVIVE),
    # pytorch_model.bin: the pickle (tensor geometry of the first tensor, the embedding (320, 32) of 10240 halves)
    ("pickle-huge-size-stride-0", "bin", pickle_edit("geometry", [("size", 0, 2**40), ("stride", 0, 0)]), REFUSE),
    ("pickle-negative-stride", "bin", pickle_edit("geometry", [("stride", 1, -1)]), REFUSE),
    ("pickle-negative-size", "bin", pickle_edit("geometry", [("size", 0, -1)]), REFUSE),
    ("pickle-offset-past-storage", "bin", pickle_edit("geometry", [("offset", 0, 10**6)]), REFUSE),
    *[(f"pickle-{how}-{name.replace(' ', '-')}", "bin", pickle_edit(how, name), REFUSE)
      for name in fm.payloads(Path("/m")) for how in ("inject", "replace")],
    # GGUF
    ("gguf-block-count-0", "gguf", kv(LLM, "llama.block_count", U32, 0), REFUSE),
    ("gguf-block-count-2**31", "gguf", kv(LLM, "llama.block_count", U32, 2**31), REFUSE),
    ("gguf-head-count-0", "gguf", kv(LLM, "llama.attention.head_count", U32, 0), REFUSE),
    ("gguf-rope-freq-base-0", "gguf", kv(LLM, "llama.rope.freq_base", F32, 0.0), REFUSE),
    ("gguf-rms-epsilon-nan", "gguf", kv(LLM, "llama.attention.layer_norm_rms_epsilon", F32, math.nan), REFUSE),
    ("gguf-context-2**31", "gguf", kv(LLM, "llama.context_length", U32, 2**31), SURVIVE),
    ("gguf-context-2**40", "gguf", kv(LLM, "llama.context_length", U64, 2**40), SURVIVE),
    ("gguf-array-100k-deep", "gguf", kv(LLM, "general.fuzz", fm.ARRAY, fm.deep_array()), REFUSE),
    ("gguf-alignment-0", "gguf", kv(LLM, "general.alignment", U32, 0), REFUSE),
    ("gguf-alignment-3", "gguf", kv(LLM, "general.alignment", U32, 3), REFUSE),
    ("gguf-tokens-length-lie", "gguf", gguf_edit(LLM, "array-len", "tokenizer.ggml.tokens", value=2**60), REFUSE),
    ("gguf-tensor-count-lie", "gguf", gguf_edit(LLM, "n-tensors", value=2**63), REFUSE),
    ("gguf-metadata-count-lie", "gguf", gguf_edit(LLM, "n-kv", value=2**63), REFUSE),
    ("gguf-tensor-dims-lie", "gguf", gguf_edit(LLM, "dims", value=[2**32, 2**32], i=0), REFUSE),
    ("gguf-tensor-offset-lie", "gguf", gguf_edit(LLM, "offset", value=2**40, i=0), REFUSE),
    ("gguf-tensor-type-lie", "gguf", gguf_edit(LLM, "type", value=99, i=1), REFUSE),
    ("gguf-tensor-zero-dim-overflow", "gguf", gguf_edit(LLM, "dims", value=[0, 2**63, 2**64 - 1, 64], i=20), REFUSE),
    ("mmproj-tensor-zero-dim-overflow", "gguf-mmproj", gguf_edit(MMPROJ, "dims", value=[2**32, 2**32, 0, 0], i=-1),
     REFUSE),
    ("gguf-corrupted-magic", "gguf", flip(LLM, [(0, ord("X"))]), REFUSE),
    ("mmproj-head-count-0", "gguf-mmproj", kv(MMPROJ, "clip.vision.attention.head_count", U32, 0), REFUSE),
    ("mmproj-block-count-2**31", "gguf-mmproj", kv(MMPROJ, "clip.vision.block_count", U32, 2**31), REFUSE),
]


@pytest.mark.parametrize("family, mutation, expect", [c[1:] for c in HOSTILE_CASES],
                         ids=[c[0] for c in HOSTILE_CASES])
def test_hostile(family, mutation, expect, seeds, runner, cases):
    outcome = run_mutation(runner, seeds[family], mutation, cases)
    if expect == REFUSE:
        assert outcome.startswith("TinyVLMError"), f"{mutation!r} must be refused; got:\n{outcome}"
    else:
        assert acceptable(outcome), f"{mutation!r}:\n{outcome}"


def test_payloads_are_live(tmp_path):
    """Each payload, unpickled by plain pickle in a child process, creates its marker: so the marker check of the
    pickle cases would see code run by tinyvlm's unpickler."""
    names = list(fm.payloads(Path("/m")))
    for k, name in enumerate(names):
        (tmp_path / f"{k}.pkl").write_bytes(fm.standalone(fm.payloads(tmp_path / f"{k}.marker")[name]))
    code = ("import pickle, sys\nfor p in sys.argv[1:]:\n    try:\n        pickle.loads(open(p, 'rb').read())\n"
            "    except Exception:\n        pass\n")
    subprocess.run([sys.executable, "-c", code, *(str(tmp_path / f"{k}.pkl") for k in range(len(names)))],
                   timeout=60, check=True)
    dead = [name for k, name in enumerate(names) if not (tmp_path / f"{k}.marker").exists()]
    assert not dead, f"payloads that ran no code: {dead}"


def test_runner_classifies_misbehaviour(tmp_path):
    runner = Runner(timeout_s=2)
    try:
        marker = tmp_path / "PWNED"
        outcomes = {kind: runner.run(tmp_path, marker=marker, probe=kind) for kind in
                    ("hang", "crash", "oom", "code", "error")}
    finally:
        runner.close()
    assert outcomes["hang"].startswith("hang")
    assert outcomes["crash"] == "crash:SIGSEGV"
    assert outcomes["oom"].startswith("oom: MemoryError")
    assert outcomes["code"].startswith("ran-code")
    assert outcomes["error"].startswith("other:ValueError: probe error at runner.py")

