"""Peak memory of MobileVLM_V2-1.7B int4 as users run it: `tinyvlm.load` of a quantized model directory (memory-mapped),
then one image question, in a fresh process per setting; and the image encode seconds with each vision_weights.

The model is the random-weight checkpoint of ab_trees.py, quantized by `python -m tinyvlm quantize --quant int4`
(vision tower and projector stored as float16), written once into --cache-dir. Prints one JSON line per setting:
peak RSS (ru_maxrss) after load and after the answer, the resident memory after load, and encode seconds (median).
    python benchmarks/bench_memory.py --threads 2
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _common import emit, machine_info

from ab_trees import HERE, build_models

ONE_RUN = r"""
import json, re, resource, statistics, sys, time
import numpy as np
import tinyvlm

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

def resident_mib():
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024

t0 = time.perf_counter()
vlm = tinyvlm.load(sys.argv[1], threads=int(sys.argv[2]), vision_weights=sys.argv[3])
out = {"load_s": round(time.perf_counter() - t0, 2), "load_peak_rss_mib": round(peak_mib()),
       "rss_after_load_mib": round(resident_mib())}
image = np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8)
answer = vlm.generate("What is in the image?", image, max_new_tokens=8, temperature=0)
out["peak_rss_mib"] = round(peak_mib())
pixels = vlm.preprocess(image)
times = []
for _ in range(int(sys.argv[4])):
    t0 = time.perf_counter()
    vlm.encode_image(pixels)
    times.append(time.perf_counter() - t0)
out["image_encode_s"] = round(statistics.median(times), 3)
out["image_encode_s_runs"] = [round(t, 3) for t in times]
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="timed image encodes per process")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/tinyvlm-bench"))
    args = ap.parse_args()
    _, int4 = build_models(args.cache_dir, HERE.parent)
    emit({"bench": "machine", **machine_info()})
    for vision_weights in ("float32", "int8"):
        proc = subprocess.run([sys.executable, "-c", ONE_RUN, str(int4), str(args.threads), vision_weights,
                               str(args.repeat)], capture_output=True, text=True)
        record = {"bench": "memory", "engine": "tinyvlm", "model": "MobileVLM_V2-1.7B shapes, int4 file",
                  "threads": args.threads, "vision_weights": vision_weights}
        if proc.returncode:
            emit({**record, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]})
            continue
        emit({**record, **json.loads(proc.stdout.strip().splitlines()[-1])})


if __name__ == "__main__":
    main()
