"""`fedhydra demo`: the main job, offline, on the synthetic data set with the embedded LLM.

At this stage it compares the prompt baselines (zero-shot, ICL with random items, BM25 RAG)
on synthetic LaMP-2M users whose tags follow personal habits, and prints the results table.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

from fedhydra.common.cli import llm_from_args
from fedhydra.common.prompts import default_style
from fedhydra.common.synthetic import write_synthetic
from fedhydra.common.data import load_split

from .compare import run_baselines
from .results import markdown_table, write_results

DEMO_TASK = "LaMP_2M"
DEMO_METHODS = ["zero-shot", "icl-random-4", "rag-4"]


def run_demo(args: argparse.Namespace) -> Path:
    t0 = time.perf_counter()
    out = Path(args.out)
    write_synthetic(out / "data", task=DEMO_TASK, n_users=args.users, seed=args.seed)
    split = load_split(out / "data")
    llm = llm_from_args(args)
    print(f"FedHydra demo: {split.task.name} ({split.task.title}), {len(split.users)} synthetic users, "
          f"LLM {llm.name}", flush=True)
    results, predictions = run_baselines(split.task, split.users, DEMO_METHODS, llm, seed=args.seed)
    info = {
        "data": f"synthetic {DEMO_TASK}, {len(split.users)} users, seed {args.seed} (fedhydra data synth)",
        "llm": llm.name,
        "prompt style": default_style(split.task),
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "wall s": round(time.perf_counter() - t0, 1),
    }
    md = write_results(out, split.task, results, info, predictions)
    print()
    print(markdown_table(split.task, results))
    print(f"\nresults: {md} and {out / 'results.json'}")
    return out
