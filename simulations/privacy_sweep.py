"""`fedhydra privacy-sweep`: the privacy-utility trade-off. The federated pipeline (simulations/simulate.py)
runs once per privacy budget on the same clients and test users; the table and the plot show the task metric
of `hydra-fed` against the epsilon asked for and the epsilon actually spent, with the non-private `hydra-fed`
and the best `rag-k` on the same users as reference lines.

Budgets: "inf" is the non-private run (dp off), always run (first): it is the reference line. A number is
dp-epsilon for the whole planned training in the chosen mode (`user`: central DP on the shared arrays;
`record`: DP-SGD on each client, epsilon per pseudo-query). Every run keeps its own folder OUT/eps-<budget>/
with its federated.json and privacy statement.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from fedhydra.common import settings
from fedhydra.common.data import dataset_name
from fedhydra.common.files import write_atomic
from fedhydra.common.llm import default_cache_dir, llm_from_settings
from fedhydra.common.partition import federated_split, load_users

from .compare import run_baselines
from .plots import save_figure
from .simulate import federated_plan, run_federated


def parse_epsilons(text: str) -> list[float]:
    """"inf,8,4,1" -> [inf, 8.0, 4.0, 1.0]; each must be inf or a positive number, given once. The non-private
    run (inf) is added first when missing: the sweep's reference line comes from it."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            eps = math.inf if part.lower() in ("inf", "off") else float(part)
        except ValueError:
            raise ValueError(f"--epsilons: {part!r} is not a number or inf") from None
        if not eps > 0:
            raise ValueError(f"--epsilons: {part!r} must be positive (or inf for the non-private run)")
        if eps in out:
            raise ValueError(f"--epsilons: {part!r} is given twice")
        out.append(eps)
    if not out:
        raise ValueError("--epsilons is empty; give e.g. inf,8,4,1")
    return out if math.inf in out else [math.inf, *out]


def _spent(doc: dict) -> tuple[float | None, float | None]:
    """(epsilon spent, item epsilon for record mode) from federated.json's privacy statement."""
    privacy = doc.get("privacy") or {}
    eps = privacy.get("epsilon")
    return (float(eps) if eps is not None else None), privacy.get("item_epsilon")


def sweep_plan(args: argparse.Namespace, values: dict) -> dict:
    """What the sweep will run, decided before anything starts: every budget's Flower run settings."""
    epsilons = parse_epsilons(args.epsilons)
    out = Path(args.out).expanduser().resolve()
    values = values | {"cache-dir": str(default_cache_dir(values["cache-dir"] or None).resolve())}
    split = load_users(values)
    values = values | {"data-name": dataset_name(values["data"], split.task, values["data-name"])}
    test_users = [u for role, users in federated_split(split, values) if role == "test" for u in users]
    if not test_users:
        raise ValueError("--test-clients must be at least 1: the metric is measured on the test clients' users")
    given = tuple(settings.from_args(args))
    runs = {}
    for eps in epsilons:
        private = not math.isinf(eps)
        label = "inf" if not private else f"{eps:g}"
        run = values | {"dp": args.mode if private else "off", "dp-epsilon": eps if private else 0.0}
        runs[label] = (run, federated_plan(run, out / f"eps-{label}", args.parallel, given)[0])
    return {"out": out, "task": split.task, "test_users": test_users, "values": values, "mode": args.mode,
            "parallel": args.parallel, "given": given, "runs": runs, "rag": f"rag-{values['k']}",
            "style": values["style"] or None}


def sweep_command(args: argparse.Namespace, values: dict) -> Path:
    plan = sweep_plan(args, values)
    out, task, values = plan["out"], plan["task"], plan["values"]
    metric = task.metrics[0]
    llm = llm_from_settings(values)
    rag_name = plan["rag"]
    [rag], _ = run_baselines(task, plan["test_users"], [rag_name], llm, seed=int(values["seed"]), style=plan["style"],
                             progress=False)
    rows = []
    for label, (run, _) in plan["runs"].items():
        private = label != "inf"
        print(f"privacy sweep: epsilon {label} ({args.mode if private else 'no DP'})", flush=True)
        doc = run_federated(run, out / f"eps-{label}", plan["parallel"], given=plan["given"])
        spent, item = _spent(doc)
        ev = doc.get("evaluation")
        rows.append({"epsilon": label, "mode": args.mode if private else "off", "status": doc["status"],
                     metric: ev["metrics"][metric] if ev else None, "epsilon_spent": spent, "item_epsilon": item,
                     "users": ev["users"] if ev else 0})
    reference = next((r[metric] for r in rows if r["mode"] == "off"), None)
    doc = {"task": task.name, "data set": values["data-name"],
           "metric": metric, "mode": args.mode, "rows": rows,
           "references": {"hydra-fed (no DP)": reference, rag_name: rag.metrics[metric]}, "settings": values}
    write_atomic(out / "sweep.json", json.dumps(doc, indent=1) + "\n")
    md = sweep_table(doc)
    write_atomic(out / "sweep.md", md)
    plot_sweep(doc, out / "sweep.png")
    print("\n" + md + f"\nresults: {out / 'sweep.md'}, {out / 'sweep.png'}", flush=True)
    return out


def sweep_table(doc: dict) -> str:
    metric = doc["metric"]
    lines = [f"# Privacy sweep: {doc.get('data set') or doc['task']}, {metric} of hydra-fed against epsilon ({doc['mode']}-level DP)", "",
             f"| epsilon asked | DP | {metric} | epsilon spent | epsilon per item | status |", "|---|---|---|---|---|---|"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in doc["rows"]:
        lines.append(f"| {r['epsilon']} | {r['mode']} | {fmt(r[metric], '.4f')} | {fmt(r['epsilon_spent'], '.3f')} | "
                     f"{fmt(r['item_epsilon'], '.2f')} | {r['status']} |")
    lines += [""] + [f"- reference, {name}: {fmt(v, '.4f')}" for name, v in doc["references"].items()]
    return "\n".join(lines) + "\n"


def plot_sweep(doc: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    metric = doc["metric"]
    pts = sorted((float(r["epsilon"]), r[metric]) for r in doc["rows"] if r["mode"] != "off" and r[metric] is not None)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"hydra-fed, {doc['mode']}-level DP")
        ax.set_xscale("log")
        ax.set_xticks([p[0] for p in pts], [f"{p[0]:g}" for p in pts])
        ax.minorticks_off()
    styles = iter(("--", ":"))
    for name, value in doc["references"].items():
        if value is not None:
            ax.axhline(value, linestyle=next(styles), color="grey" if "rag" in name else "black", label=name)
    ax.set_xlabel("epsilon (delta as set; log scale)")
    ax.set_ylabel(metric)
    users = max((r.get("users") or 0 for r in doc["rows"]), default=0)
    ax.set_title(f"{doc['task']}: {metric} against the privacy budget ({users} test users)", fontsize="medium")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, fontsize="small", frameon=False)
    save_figure(fig, path)
    plt.close(fig)
    return path
