"""A comparison across seeds (pipelines/compare.py seeds=[...]): <root>/seed_<s>/<run>/ for every
seed, each seed its own corpus draw and base. Every metric of each run's final evaluation becomes
a mean with its 95% interval over seeds beside the per-seed values; the arms RLP is judged against
are compared seed by seed (paired t-test), and task accuracy also on counts pooled over seeds
(Fisher's exact test)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from training.metrics import base_counters, read_metrics
from training.stats import fisher_exact, mean_ci, paired_test

# The final evaluation's metrics, and what the RLP steps' rewards did (first and last quarter).
METRICS = {"eval/bpb": "held-out bpb", "eval/answer_nll": "answer NLL, no thought",
           "eval/answer_nll_think": "answer NLL after a thought", "eval/task_acc": "task acc, no thought",
           "eval/task_acc_think": "task acc after a thought", "eval/think_closed_frac": "thoughts closed",
           "gain/first": "mean information gain, first quarter", "gain/last": "mean information gain, last quarter",
           "gain/change": "information gain change (last - first quarter)"}
THINK_METRICS = ("eval/answer_nll_think", "eval/task_acc_think", "eval/think_closed_frac")  # depend on the length
PAIRS = [("rlp", "cpt"), ("rlp", "cpt_flops"), ("rlp_pure", "cpt"), ("rlp_pure", "cpt_flops")]


def final_metrics(run_dir: Path) -> dict:
    """One run's final evaluation, its information gain by quarter, what it spent after its base,
    and its evaluations with thoughts of other lengths (<metric>@<n>, compare.py eval_think_tokens)."""
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if r.get("eval/bpb") is not None]
    out = {k: evals[-1][k] for k in METRICS if evals and evals[-1].get(k) is not None}
    if evals and "eval/task_problems" in evals[-1]:
        out["task_problems"] = evals[-1]["eval/task_problems"]
    gains = [r["rlp/reward_mean"] for r in records if r.get("rlp/reward_mean") is not None]
    if gains:
        k = max(1, len(gains) // 4)  # as training/rlp_loop.py summarises: one step is noisy
        out["gain/first"], out["gain/last"] = sum(gains[:k]) / k, sum(gains[-k:]) / k
        out["gain/change"] = out["gain/last"] - out["gain/first"]
    base = base_counters(run_dir.parent / "base_ttt" / "model") if run_dir.name != "base_ttt" else {}
    last = records[-1] if records else {}
    for key in ("tokens/data", "flops/total"):
        if key in last:
            out[f"phase/{key}"] = last[key] - base.get(key, 0)
    for path in sorted(run_dir.glob("task_eval_think*.json")):
        extra = json.loads(path.read_text())
        out.update({f"{k}@{extra['think_tokens']}": v for k, v in extra.items() if k in THINK_METRICS})
    return out


def pooled_solved(finals: list[dict]) -> tuple[int, int] | None:
    """Problems solved after a thought and problems posed, summed over runs (None if not logged)."""
    if not all("task_problems" in f and "eval/task_acc_think" in f for f in finals):
        return None
    return (sum(round(f["eval/task_acc_think"] * f["task_problems"]) for f in finals),
            sum(int(f["task_problems"]) for f in finals))


def run_dirs(seed_dir: Path) -> list[Path]:
    """The runs of one seed's compare: directories with metrics, less those a restarted run moved
    aside (<run>.<YYYYmmdd-HHMMSS>, training/run.py), which are not arms."""
    return [m.parent for m in sorted(Path(seed_dir).glob("*/metrics.jsonl")) if "." not in m.parent.name]


def summarize(root: Path) -> dict:
    """{seeds, runs: {run: {seed: finals}}, arms: {run: {metric: interval}}, pairs: [...]}."""
    seeds = sorted(int(p.name[5:]) for p in Path(root).glob("seed_*") if p.name[5:].isdigit())
    runs: dict[str, dict[int, dict]] = {}
    for seed in seeds:
        for run in run_dirs(Path(root) / f"seed_{seed}"):
            finals = final_metrics(run)
            if finals:
                runs.setdefault(run.name, {})[seed] = finals
    arms = {}
    for name, by_seed in runs.items():
        keys = sorted({k for f in by_seed.values() for k in f if not k.startswith("phase/") and k != "task_problems"})
        arms[name] = {k: vars(mean_ci([f[k] for f in by_seed.values() if k in f])) for k in keys}
    pairs = []
    for a, b in PAIRS:
        if a not in runs or b not in runs:
            continue
        common = [s for s in seeds if s in runs[a] and s in runs[b]]
        for metric in METRICS:
            if all(metric in runs[a][s] and metric in runs[b][s] for s in common) and common:
                test = paired_test([runs[a][s][metric] for s in common], [runs[b][s][metric] for s in common])
                pairs.append({"a": a, "b": b, "metric": metric, "seeds": common, "diff": vars(test.diff),
                              "t": test.t, "p": test.p})
        solved = [pooled_solved([runs[x][s] for s in common]) for x in (a, b)]
        if common and None not in solved:
            (sa, na), (sb, nb) = solved
            pairs.append({"a": a, "b": b, "metric": "pooled task acc after a thought", "seeds": common,
                          "solved": [sa, na, sb, nb], "p": fisher_exact(sa, na, sb, nb)})
    return {"seeds": seeds, "runs": runs, "arms": arms, "pairs": pairs}


def write(grid: dict, root: Path) -> Path:
    path = Path(root) / "seeds.json"
    path.write_text(json.dumps(grid, indent=1, default=str))
    return path


def _num(v: float, spec: str = ".4f") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def tables(grid: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table: arms across seeds, each seed's values, the paired tests."""
    n = len(grid["seeds"])
    metrics = [m for m in METRICS if any(m in a for a in grid["arms"].values())]
    extra = sorted({k for a in grid["arms"].values() for k in a if "@" in k})
    cols = metrics + extra
    label = {**METRICS, **{k: f"{METRICS[k.split('@')[0]]} ({k.split('@')[1]}-token thoughts)" for k in extra}}

    def cell(iv: dict | None) -> str:
        if iv is None:
            return "–"
        return (f"{iv['mean']:.4f} [{iv['low']:.4f}, {iv['high']:.4f}]" if iv["n"] > 1 else f"{iv['mean']:.4f}") + \
            ("" if iv["n"] == n else f" (n={iv['n']})")

    across = [[name] + [cell(arm.get(k)) for k in cols] for name, arm in grid["arms"].items()]
    per_seed = [[name, str(s)] + [_num(f.get(k)) for k in cols] +
                [_num(f.get("phase/tokens/data"), ",.0f"), _num(f.get("phase/flops/total"), ".3g")]
                for name, by_seed in grid["runs"].items() for s, f in sorted(by_seed.items())]
    paired = [[f"{p['a']} − {p['b']}", METRICS.get(p["metric"], p["metric"]), str(len(p["seeds"])),
               (f"{p['diff']['mean']:+.4f} [{p['diff']['low']:+.4f}, {p['diff']['high']:+.4f}]" if "diff" in p else
                f"{p['solved'][0]}/{p['solved'][1]} vs {p['solved'][2]}/{p['solved'][3]}"),
               "paired t" if "diff" in p else "Fisher exact", _num(p["p"], ".3g")] for p in grid["pairs"]]
    return [(f"mean [95% CI] over {n} seeds", ["arm"] + [label[k] for k in cols], across),
            ("each seed (phase: after the base)", ["arm", "seed"] + [label[k] for k in cols] +
             ["phase data tokens", "phase FLOPs"], per_seed),
            ("paired across seeds (a − b; lower is better for bpb and NLL)",
             ["pair", "metric", "seeds", "difference [95% CI] or pooled counts", "test", "p (two-sided)"], paired)]


def markdown(grid: dict) -> str:
    parts = []
    for title, header, rows in tables(grid):
        parts.append(f"{title}\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
                     + "\n".join("| " + " | ".join(r) + " |" for r in rows))
    return "\n\n".join(parts)


def curves(root: Path, metric: str, x: str = "tokens/data") -> dict[str, tuple[list[float], ...]]:
    """{run: (x, mean, low, high)} over the seeds holding the run, evaluation by evaluation (the
    seeds share the schedule; x is the mean over seeds)."""
    out = {}
    by_run: dict[str, list[list[dict]]] = {}
    for run in (r for seed_dir in sorted(Path(root).glob("seed_*")) for r in run_dirs(seed_dir)):
        points = [r for r in read_metrics(run / "metrics.jsonl") if r.get("eval/bpb") is not None and r.get(metric) is not None]
        if points:
            by_run.setdefault(run.name, []).append(points)
    for name, seeds in by_run.items():
        length = min(map(len, seeds))
        xs, mean, low, high = [], [], [], []
        for i in range(length):
            iv = mean_ci([s[i][metric] for s in seeds])
            xs.append(sum(s[i].get(x) or 0 for s in seeds) / len(seeds))
            mean.append(iv.mean)
            low.append(iv.low)
            high.append(iv.high)
        out[name] = (xs, mean, low, high)
    return out
