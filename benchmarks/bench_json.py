"""The per-token cost of JSON-constrained answers (tinyvlm/json_constraint.py): SmolLM2-135M-Instruct (the real
Q4_1 GGUF) decoding with and without response_format, alternating, in one process.

Prints one JSON line per setting: decode tok/s (median over rounds), and the candidate tokens checked per
generated token. Run: `python benchmarks/bench_json.py --threads 2 --rounds 5`.
"""
from __future__ import annotations

import argparse
import statistics

from _common import REPO, emit, pin_threads

import tinyvlm

PROMPT = "Describe a sea animal as JSON."
SCHEMA = {"type": "object", "properties": {"animal": {"enum": ["fish", "whale", "crab"]},
                                           "colours": {"type": "array", "items": {"type": "string"}},
                                           "legs": {"type": "integer"}}, "required": ["animal", "colours", "legs"]}
SETTINGS = {"none": None, "json_object": {"type": "json_object"},
            "json_schema": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    args = ap.parse_args()
    pin_threads(args.threads)
    import sys

    sys.path.insert(0, str(REPO))
    from tests.conftest import smollm2_path

    vlm = tinyvlm.load(smollm2_path(), threads=args.threads)
    rates: dict[str, list[float]] = {name: [] for name in SETTINGS}
    tried: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, fmt in SETTINGS.items():  # alternating: the machine's drift hits every setting alike
            constraint = vlm.json_constraint(fmt)
            original = vlm.json_constraint
            vlm.json_constraint = lambda _fmt, c=constraint: c  # to read its count of candidates afterwards
            try:
                vlm.generate(PROMPT, max_new_tokens=args.tokens, temperature=args.temperature, seed=1,
                             response_format=fmt)
            finally:
                vlm.json_constraint = original
            rates[name].append(vlm.stats.decode_tok_s)
            if constraint is not None:
                tried[name].append(constraint.tried / max(vlm.stats.answer_tokens, 1))
    base = statistics.median(rates["none"])
    for name in SETTINGS:
        rate = statistics.median(rates[name])
        emit({"bench": "json_constraint", "model": "SmolLM2-135M-Instruct Q4_1", "setting": name,
              "threads": args.threads, "temperature": args.temperature, "tokens": args.tokens,
              "rounds": args.rounds, "decode_tok_s": round(rate, 1), "decode_tok_s_runs": [round(r, 1) for r in
                                                                                             rates[name]],
              "ms_per_token_over_none": round(1e3 / rate - 1e3 / base, 2),
              "candidates_per_token": round(statistics.median(tried[name]), 1) if tried[name] else None})


if __name__ == "__main__":
    main()
