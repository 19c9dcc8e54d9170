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


class MethodsFailed(RuntimeError):
    """Some methods failed; the finished methods' results were written before this was raised."""


class Outcomes:
    """The methods' results as they finish. A method that fails is recorded (its traceback in OUT/failures.log)
    and the others go on, so one failure never takes the finished results with it."""

    def __init__(self, out: Path):
        self.out, self.results, self.predictions, self.failures = Path(out), [], {}, {}

    def attempt(self, names: list[str], run) -> bool:
        """run() -> (results, predictions) of the methods `names`; False (and recorded) if it raised."""
        import traceback

        try:
            results, predictions = run()
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of one method is reported, not fatal to the others
            line = " ".join(f"{type(exc).__name__}: {exc}".split())
            self.failures |= {name: line for name in names}
            log = self.out / "failures.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("a", encoding="utf-8") as f:
                f.write(f"== {', '.join(names)}\n{traceback.format_exc()}\n")
            print(f"{', '.join(names)} failed: {line}", flush=True)
            return False
        self.results += results
        self.predictions |= predictions
        return True

    def fail(self, names: list[str], why: str) -> None:
        """Record methods that cannot run (a method they depend on did not finish)."""
        self.failures |= {name: why for name in names}
        print(f"{', '.join(names)} not run: {why}", flush=True)

    def raise_failures(self) -> None:
        if self.failures:
            what = "; ".join(f"{name}: {line}" for name, line in self.failures.items())
            raise MethodsFailed(f"{len(self.failures)} method(s) failed ({what}); the finished methods' results "
                                f"are in {self.out}, tracebacks in {self.out / 'failures.log'}")


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


def cut_note(results: list[MethodResult]) -> str:
    """One sentence on the prompts cut to fit the LLM's context window (common/fit.py), per method that built any."""
    parts = []
    for r in results:
        p = r.extra.get("prompts")
        if p and p.get("prompts"):
            parts.append(f"{r.method} {p['cut']} of {p['prompts']}" + (
                f" (mean {p['mean_removed']:g} tokens removed, at most {p['most_removed']})" if p["cut"] else ""))
    if not parts:
        return ""
    return ("\n\nPrompts cut to fit the context window (LaMP's truncation by token count, common/fit.py): "
            + "; ".join(parts) + ".")


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
    failed = (extra or {}).get("failed")
    write_atomic(out / "results.json", json.dumps(doc, indent=2) + "\n")
    info = "\n".join(f"- {k}: {v}" for k, v in run_info.items())
    note = ""
    if ratios:
        base = next(iter(ratios.values()))["baseline"]
        how = (f"each method's {task.metrics[0]} over the best prompt baseline's ({base})" if task.higher_is_better
               else f"the best prompt baseline's ({base}) {task.metrics[0]} over each method's, so that above 1 means "
                    f"a lower error, as for every ratio here (per user: |error|, the rating metric's convention)")
        note = (f"\n\nRatio: {how}, on the same users, with a 95% paired bootstrap interval over users.")
    note += cut_note(results)
    rules = [f"{r.method}: {r.extra['rule']}" for r in results if r.extra.get("rule")]
    if rules:
        note += "\n\nWhat the training-free rules learned from the training users: " + "; ".join(rules) + "."
    if failed:
        note += "\n\nFailed (no result): " + "; ".join(f"{name}: {line}" for name, line in failed.items())
    title = run_info.get("data set") or f"{task.name} ({task.title})"
    md = f"# {title}\n\n{info}\n\n{markdown_table(task, results, ratios)}{note}\n"
    if appendix:
        md += "\n" + appendix.rstrip("\n") + "\n"
    write_atomic(out / "results.md", md)
    for method, rows in (predictions or {}).items():
        write_atomic(out / "predictions" / f"{method}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return out / "results.md"
