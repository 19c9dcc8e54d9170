"""The privacy statement of a run: federated.json's "privacy" section, and the same as markdown for results.md.

It says what trusted systems report (PRIVACY.md "How trusted systems report it"): the unit protected, the
neighbouring relation, the sampling assumption, the accountant, the noise multiplier, the clip norm, the
cumulative epsilon at delta after every round, a hard stop before the budget is exceeded, and what no
mechanism here covers. Written for every run with dp or secagg set; rounds without a release say so.
"""

from __future__ import annotations

from .central_dp import ACCOUNTANT, UserLevelDP, epsilon_after
from .secagg import NUM_SHARES, QUANTIZATION_RANGE, RECONSTRUCTION_THRESHOLD


def _not_covered(values: dict) -> list[str]:
    remote = values["llm"] != "embedded"
    return [
        "per-client metrics: in DP mode a train reply carries num-examples = 1 and its costs (LLM calls, tokens, "
        "cache hits, seconds), which depend on the client's data size and are not noised; per-client training "
        "loss, accuracy, example and user counts are dropped",
        "the describe replies (how many train and test users each client holds) and install acknowledgements",
        "the adapter-margin calibration sums and the fit-and-evaluate statistics of the test clients: sums of "
        "metric statistics over their users, sent without noise",
        "the profile text that reaches the LLM in prompts (label generation and every answer): "
        + ("with this run's remote LLM provider (llm=openai) every user's profile items in prompts leave the "
           "device" if remote else "this run uses the embedded LLM, which keeps it on the device; with a remote "
           "provider (llm=openai) it would leave the device"),
        "the test clients' users: their heads are fitted locally from the released model and never leave, but "
        "they are not part of the accounted training",
    ]


def statement(values: dict, dp: UserLevelDP | None, rounds: list[dict], stopped: str = "") -> dict:
    """The "privacy" section of federated.json for a run with these settings, after `rounds`."""
    per_client = int(values["users-per-client"])
    doc: dict = {"dp": values["dp"], "secure_aggregation": bool(values["secagg"])}
    if dp:
        releases = dp.releases
        doc |= {
            "unit_protected": "user (one user per client)" if per_client == 1 else
            f"client ({per_client} users per client): the bound holds for a client's whole contribution",
            "neighbouring_relation": "add-or-remove-one client (its whole clipped update)",
            "sampling": f"no amplification assumed (fraction-train {values['fraction-train']}; clients are sampled "
                        "with the public round seed, so sampling earns no privacy credit)",
            "accountant": ACCOUNTANT,
            "mechanism": "each client's update (returned minus received shared arrays) clipped to L2 norm C on the "
                         "client (Flower's fixedclipping_mod); Gaussian noise of std z*C/n added by the server to "
                         "the mean of the n updates ("
                         + ("the SecAgg+ mean, which is all the server sees, noised with Flower's DP functions"
                            if values["secagg"] else "Flower's DifferentialPrivacyClientSideFixedClipping")
                         + "); noise seeded from OS entropy, not the run seed",
            "protects": "the shared arrays released after every round: the trainable base layers and default head "
                        "of the reranker and the adapter (per-user heads never leave a client)",
            "noise_multiplier": dp.noise_multiplier, "noise_multiplier_source": dp.source,
            "clip_norm": dp.clip, "delta": dp.delta, "max_epsilon": dp.max_epsilon,
            "planned_releases": dp.planned_releases, "releases": releases, "epsilon": dp.epsilon,
            "epsilon_per_round": [{"round": r["round"], "epsilon": r.get("epsilon"),
                                   "released": r.get("released", True)} for r in rounds],
            "dropouts": "a round with fewer replies than sampled clients releases nothing and spends nothing",
        }
        if per_client > 1:
            # removing one user keeps its client: that client's clipped update moves by up to 2C (replace-one),
            # i.e. the noise covers it with multiplier z/2
            doc["user_epsilon_bound"] = {
                "epsilon": epsilon_after(dp.noise_multiplier / 2, dp.delta, releases),
                "why": "a user whose client keeps other users changes that client's clipped update by up to 2C "
                       "(replace-one), which the same noise covers with multiplier z/2; the per-client epsilon "
                       "above does not apply to such a user",
            }
    elif values["dp"] == "record":
        per_round = [{"round": r["round"], **r["record_dp"]} for r in rounds if "record_dp" in r]
        doc |= {"unit_protected": "record: one pseudo-query (every training pair one profile item made as a query); "
                "an item inside other pseudo-queries is covered by the group-privacy epsilon (item_epsilon)",
                "neighbouring_relation": "add-or-remove-one pseudo-query of a client",
                "sampling": "Poisson sampling of pseudo-queries on each client (OS entropy)",
                "accountant": "Opacus RDP accountant per client, kept in the client's state folder across rounds, "
                              "runs and restarts",
                "mechanism": "DP-SGD with Opacus on each client (client/privacy.py): per-pseudo-query gradients "
                             "clipped to C, Gaussian noise z*C per step",
                "server_noise": "none: the server adds no user-level noise; each client accounts its own records "
                                "and reports its epsilon",
                "epsilon": max((r["epsilon"] for r in per_round), default=0.0),
                "item_epsilon": max((r["item_epsilon"] for r in per_round), default=0.0),
                "delta": float(values["dp-delta"]), "epsilon_per_round": per_round}
    if values["secagg"]:
        doc["secagg"] = {
            "protocol": "SecAgg+ (Flower's SecAggPlusWorkflow and secaggplus_mod), honest-but-curious server",
            "hides": "every client's update: the server sees only the mean of the sampled clients' clipped deltas",
            "visible": "num_examples (1) and the fit metrics of every client, and which clients took part",
            "clipping_range": float(values["dp-clip"]), "quantization_range": QUANTIZATION_RANGE,
            "num_shares": f"{NUM_SHARES:.0%} of the sampled clients", "reconstruction_threshold":
            f"{RECONSTRUCTION_THRESHOLD:.0%} of the shares", "timeout_s": float(values["round-timeout"]),
        }
    doc["not_covered"] = _not_covered(values)
    if stopped:
        doc["stopped"] = stopped
    return doc


def markdown_lines(privacy: dict) -> list[str]:
    """federated.json's privacy section as a markdown section for results.md."""
    lines = ["## Privacy", ""]
    if "noise_multiplier" in privacy:
        lines += [f"- unit protected: {privacy['unit_protected']}",
                  f"- neighbouring relation: {privacy['neighbouring_relation']}",
                  f"- sampling: {privacy['sampling']}",
                  f"- accountant: {privacy['accountant']}",
                  f"- mechanism: {privacy['mechanism']}",
                  f"- protects: {privacy['protects']}",
                  f"- noise multiplier z = {privacy['noise_multiplier']:.4g} ({privacy['noise_multiplier_source']}), "
                  f"clip norm C = {privacy['clip_norm']:g}, delta = {privacy['delta']:g}, max epsilon = "
                  f"{privacy['max_epsilon'] if privacy['max_epsilon'] is not None else 'none'}",
                  f"- epsilon spent: {privacy['epsilon']:.4f} at delta {privacy['delta']:g} after "
                  f"{privacy['releases']} of {privacy['planned_releases']} planned releases",
                  "", "| round | epsilon after the round |", "|---|---|"]
        lines += [f"| {r['round']} | " + (f"{r['epsilon']:.4f}" if r["epsilon"] is not None else "-")
                  + ("" if r["released"] else " (no release)") + " |" for r in privacy["epsilon_per_round"]]
        lines.append("")
        if "user_epsilon_bound" in privacy:
            b = privacy["user_epsilon_bound"]
            lines.append(f"- a single user of a multi-user client: epsilon <= {b['epsilon']:.4f} ({b['why']})")
    elif "unit_protected" in privacy:
        lines += [f"- unit protected: {privacy['unit_protected']}", f"- server noise: {privacy['server_noise']}"]
        if privacy.get("epsilon_per_round"):
            lines += [f"- neighbouring relation: {privacy['neighbouring_relation']}",
                      f"- sampling: {privacy['sampling']}", f"- accountant: {privacy['accountant']}",
                      f"- mechanism: {privacy['mechanism']}",
                      f"- epsilon spent (worst client): {privacy['epsilon']:.4f} per pseudo-query, "
                      f"{privacy['item_epsilon']:.4f} per profile item, at delta {privacy['delta']:g}",
                      "", "| round | epsilon (pseudo-query) | epsilon (item) | z | C | clients out of budget |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {r['round']} | {r['epsilon']:.4f} | {r['item_epsilon']:.4f} | {r['noise_multiplier']:.4g} "
                      f"| {r['clip']:g} | {r['exhausted_clients']} |" for r in privacy["epsilon_per_round"]]
            lines.append("")
    if "secagg" in privacy:
        s = privacy["secagg"]
        lines += [f"- secure aggregation: {s['protocol']}; hides {s['hides']}; visible: {s['visible']}; "
                  f"values clipped to +-{s['clipping_range']:g} and quantized to {s['quantization_range']} levels"]
    if privacy.get("stopped"):
        lines.append(f"- stopped: {privacy['stopped']}")
    lines += ["- not covered by any guarantee here:"] + [f"  - {item}" for item in privacy["not_covered"]]
    return lines
