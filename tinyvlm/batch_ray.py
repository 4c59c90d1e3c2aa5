"""`batch --ray [ADDRESS]`: the same batch on a Ray cluster, through Ray Data (the `[ray]` extra).

The (image, prompt) pairs still to answer become a dataset; `map_batches` runs them through a pool of actors, each
of which loads the model once and answers one pair at a time. The driver writes each result as it arrives, through
the same line-atomic writer, so the output and its resuming are those of a local batch.

Resources that cannot deadlock: the dataset is built in the driver (from_items: no read task that needs a CPU),
and an actor asks for `actor_cpus` (default 0.5) of a CPU, so that Ray Data's own tasks find room beside the actors
even where these take every core (2 actors of 1 CPU on 2 cores were seen to hang a job whose read task starved).
Each actor's kernels run on max(1, floor(actor_cpus)) threads. Without an address, a local cluster of this
machine's cores is started and stopped again.
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

from tinyvlm.batch import FIELDS, Item, Writer, answerer, record
from tinyvlm.errors import TinyVLMError


class Answerer:
    """A Ray Data actor: one model, loaded once; answers a batch of {"image", "prompt"} rows."""

    def __init__(self, load_options: dict[str, Any], generation: dict[str, Any], threads: int) -> None:
        import tinyvlm

        self.answer = answerer(tinyvlm.load(**load_options, threads=threads), generation)

    def __call__(self, rows: dict[str, Any]) -> dict[str, list[Any]]:
        lines = [record(self.answer, Item(image, prompt)) for image, prompt in zip(rows["image"], rows["prompt"])]
        return {key: [line[key] for line in lines] for key in FIELDS}


def run(address: str | None, todo: list[Item], writer: Writer, load_options: dict[str, Any],
        generation: dict[str, Any], actors: int = 2, actor_cpus: float = 0.5,
        progress: Callable[[int, int, float], None] | None = None) -> dict[str, int]:
    """Answer `todo` on Ray (a cluster at `address`, or a local one), writing each line as it comes back."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise TinyVLMError("--ray needs Ray Data, which is not installed: pip install 'tinyvlm[ray]'") from None
    if actors < 1 or not 0 < actor_cpus <= 64:
        raise TinyVLMError("--ray-actors must be at least 1 and --ray-actor-cpus between 0 and 64")
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     **({} if address else {"num_cpus": os.cpu_count()}))
        except Exception as e:  # a wrong address, a cluster that does not answer: one line
            raise TinyVLMError(f"cannot start or reach the Ray cluster {address or '(local)'}: {e}") from None
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # tinyvlm's own bar is the one on stderr
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        dataset = ray.data.from_items([{"image": item.image, "prompt": item.prompt} for item in todo])
        results = dataset.map_batches(
            Answerer, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=actor_cpus,
            fn_constructor_kwargs={"load_options": load_options, "generation": generation,
                                   "threads": max(1, math.floor(actor_cpus))})
        counts, start = {"answered": 0, "failed": 0}, time.perf_counter()
        for n, row in enumerate(results.iter_rows(), 1):
            line = {key: row[key] for key in FIELDS}
            line["tokens"], line["seconds"] = int(line["tokens"]), float(line["seconds"])  # from NumPy scalars
            counts["failed" if line["error"] else "answered"] += 1
            writer.write(line)
            if progress is not None:
                progress(n, len(todo), time.perf_counter() - start)
        return counts
    finally:
        if started:
            ray.shutdown()
