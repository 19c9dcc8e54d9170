"""The results folder every run writes: results.json, results.md and per-method predictions.

results.json holds, per method: the task's metrics, number of users, LLM calls, tokens, cache hits,
wall time, and the ratio to the best prompt baseline with its 95% paired bootstrap interval
(DESIGN.md "Results every run writes").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedhydra.common.files import write_atomic
from fedhydra.common.tasks import Task

DIAGNOSTIC = {"oracle": "oracle (upper bound, not a method)"}


@dataclass
class MethodResult:
    method: str
    metrics: dict[str, float]
    users: int
    llm_calls: int
    tokens: int
    cache_hits: int
    wall_s: float
    extra: dict = field(default_factory=dict)


def markdown_table(task: Task, results: list[MethodResult], ratios: dict[str, dict] | None = None) -> str:
    cols = list(task.metrics)
    ratios = ratios or {}
    head = ["method", *cols] + (["ratio to best prompt (95% CI)"] if ratios else []) + \
        ["users", "LLM calls", "tokens", "cache hits", "wall s"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        vals = [f"{r.metrics[c]:.4f}" if c != "bleu" else f"{r.metrics[c]:.3f}" for c in cols]
        if ratios:
            q = ratios.get(r.method)
            vals.append("" if not q else f"{q['ratio']:.3f} ({q['low']:.3f}-{q['high']:.3f})" if q.get("low") is not None
                        else f"{q['ratio']:.3f} (point; only sums leave clients)")
        rows.append("| " + " | ".join([DIAGNOSTIC.get(r.method, r.method), *vals, str(r.users), str(r.llm_calls),
                                        str(r.tokens), str(r.cache_hits), f"{r.wall_s:.1f}"]) + " |")
    return "\n".join(rows)


def write_results(out: Path, task: Task, results: list[MethodResult], run_info: dict,
                  predictions: dict[str, list[dict]] | None = None, extra: dict | None = None,
                  ratios: dict[str, dict] | None = None, appendix: str = "") -> Path:
    """Write results.json, results.md and predictions/<method>.jsonl into `out`; returns results.md's path.

    `run_info` (short facts) goes into both files; `extra` (configs, training reports) into results.json only;
    `appendix` (markdown, e.g. the privacy statement) ends results.md.
    """
    out = Path(out)
    methods = {r.method: asdict(r) | ({"ratio": ratios[r.method]} if ratios and r.method in ratios else {})
               for r in results}
    doc = {"task": task.name, **run_info, "methods": methods, **(extra or {})}
    write_atomic(out / "results.json", json.dumps(doc, indent=2) + "\n")
    info = "\n".join(f"- {k}: {v}" for k, v in run_info.items())
    note = ""
    if ratios:
        base = next(iter(ratios.values()))["baseline"]
        note = (f"\n\nRatio: each method's {task.metrics[0]} over the best prompt baseline's ({base}) on the same "
                f"users{' (inverted: lower MAE is better)' if not task.higher_is_better else ''}, with a 95% paired "
                "bootstrap interval over users.")
    md = f"# {task.name} ({task.title})\n\n{info}\n\n{markdown_table(task, results, ratios)}{note}\n"
    if appendix:
        md += "\n" + appendix.rstrip("\n") + "\n"
    write_atomic(out / "results.md", md)
    for method, rows in (predictions or {}).items():
        write_atomic(out / "predictions" / f"{method}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return out / "results.md"
