"""The data-efficiency dashboard: held-out quality against corpus tokens (and FLOPs), one line per
run, from the runs' metrics.jsonl.

    python pipelines/report.py runs/compare                 # -> runs/compare/report/index.html + PNGs
    python pipelines/report.py runs/ --baseline ntp_plain --out my_report

Writes one self-contained HTML page (plots embedded) and the PNGs beside it, with a table of the
data tokens each run needed to reach the baseline's final held-out bits per byte; the same curves
go to an offline wandb run (`--wandb online` to upload). A run that pretrained its own base model
(runs/<rlp>/base/) is drawn from the start of that pretraining. A folder with a long_context.json
(pipelines/long_context.py) gets the long-context panel: loss by position, log x, for every run with
and without carried state, and the mean loss within and beyond the sliding window. A folder of
seeds (compare.py seeds=[...]: seed_<s>/) gets every metric as the mean and 95% interval over
seeds, bands on the curves, and the paired tests of RLP against its baselines.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from training import seed_grid  # noqa: E402
from training.long_context import mean_loss  # noqa: E402
from training.evaluate import wilson_interval  # noqa: E402
from training.metrics import read_metrics  # noqa: E402

AXES = {"tokens/data": "data tokens (corpus tokens trained on)", "flops/total": "training FLOPs"}
QUALITY = {"eval/bpb": "held-out bits per byte (lower is better)",
           "eval/task_acc": "held-out task accuracy, no thought",
           "eval/task_acc_think": "held-out task accuracy after a thought",
           "eval/answer_nll": "answer NLL per token, no thought (lower is better)",
           "eval/answer_nll_think": "answer NLL per token after a thought (lower is better)"}
# RLP's per-step diagnostics, drawn against the step for every run that logs them.
DIAGNOSTICS = {"rlp/reward_mean": "mean reward (information gain, nats)", "rlp/reward_pos_frac": "share of rewards > 0",
               "rlp/closed_frac": "share of thoughts the policy closed", "rlp/thought_len": "thought length (tokens)"}
# RPT's next-token accuracy on held-out positions, by the proxy's entropy there (nats).
RPT_BUCKETS = {"easy": "> 0.5", "medium": "> 1.0", "hard": "> 1.5"}
CLOSED_FRAC_WARNING = 0.5


@dataclass
class Run:
    name: str
    path: Path
    points: list[dict] = field(default_factory=list)  # evaluation records, in order of data tokens

    def curve(self, x: str, y: str) -> tuple[list[float], list[float]]:
        pts = [(p[x], p[y]) for p in self.points if p.get(x) is not None and p.get(y) is not None and p[x] > 0]
        return [a for a, _ in pts], [b for _, b in pts]


def find_runs(root: Path) -> list[Run]:
    """Every directory under root with a metrics.jsonl holding evaluations; a base/ pretraining
    is folded into the run that made it."""
    runs = []
    for metrics in sorted(root.rglob("metrics.jsonl")):
        run_dir = metrics.parent
        if run_dir.name == "base" and (run_dir.parent / "metrics.jsonl").is_file():
            continue
        records = [r for r in read_metrics(metrics) if r.get("eval/bpb") is not None]
        base = run_dir / "base" / "metrics.jsonl"
        if base.is_file():
            records = [r for r in read_metrics(base) if r.get("eval/bpb") is not None] + records
        if records:
            records.sort(key=lambda r: r.get("tokens/data") or 0)
            runs.append(Run(str(run_dir.relative_to(root)) if run_dir != root else run_dir.name, run_dir, records))
    return runs


def tokens_to_reach(run: Run, target_bpb: float) -> float | None:
    """Data tokens at which the run's held-out bpb first reaches target (interpolated between
    evaluations, linearly in log tokens); None if it never does."""
    xs, ys = run.curve("tokens/data", "eval/bpb")
    for i, (x, y) in enumerate(zip(xs, ys)):
        if y <= target_bpb:
            if i == 0 or ys[i - 1] == y:
                return x
            f = (ys[i - 1] - target_bpb) / (ys[i - 1] - y)
            return math.exp(math.log(xs[i - 1]) + f * (math.log(x) - math.log(xs[i - 1])))
    return None


def plot(runs: list[Run], x: str, y: str, path: Path) -> bool:
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    drawn = False
    for run in runs:
        xs, ys = run.curve(x, y)
        if xs:
            line = ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.8, label=run.name)[0]
            ci = [p.get(f"{y}_ci") for p in run.points if p.get(x) and p.get(y) is not None]
            if all(c is not None for c in ci) and len(ci) == len(ys):  # 95% Wilson intervals
                err = [[v - lo for v, (lo, _) in zip(ys, ci)], [hi - v for v, (_, hi) in zip(ys, ci)]]
                ax.errorbar(xs, ys, yerr=err, fmt="none", ecolor=line.get_color(), alpha=0.5, capsize=2)
            drawn = True
    if not drawn:
        plt.close(fig)
        return False
    return save_log_x(fig, ax, f"{QUALITY[y].split(' (')[0]} vs {AXES[x].split(' (')[0]}", AXES[x], QUALITY[y], path)


def save_log_x(fig, ax, title: str, xlabel: str, ylabel: str, path: Path) -> bool:
    """A figure with a log x axis, titled, labelled, gridded and with its legend, saved to path."""
    ax.set_xscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_diagnostics(runs: list[Run], path: Path) -> bool:
    """RLP's per-step reward, its positive share, closed thoughts and thought length."""
    series = {r.name: [m for m in read_metrics(r.path / "metrics.jsonl") if m.get("rlp/closed_frac") is not None]
              for r in runs if (r.path / "metrics.jsonl").is_file()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return False
    fig, axes = plt.subplots(1, len(DIAGNOSTICS), figsize=(4.0 * len(DIAGNOSTICS), 3.4), dpi=100)
    for ax, (key, label) in zip(axes, DIAGNOSTICS.items()):
        for name, records in series.items():
            pts = [(m["step"], m[key]) for m in records if m.get(key) is not None and math.isfinite(m[key])]
            ax.plot([a for a, _ in pts], [b for _, b in pts], linewidth=1.4, label=name)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("RLP step")
        ax.grid(True, alpha=0.3)
    axes[0].axhline(0.0, color="#888", linewidth=0.8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_long_context(curves: dict[str, dict], path: Path) -> bool:
    """Loss by position (log x) of every run, dashed where the state is carried across windows;
    dotted verticals at the sliding window and the training window."""
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(7.2, 4.4), dpi=110)
    colours = {}
    for name, c in curves.items():
        run = name.split(" ")[0]
        colour = colours.setdefault(run, f"C{len(colours)}")
        mids = [math.sqrt(max(a, 0.5) * b) for a, b in c["positions"]]  # geometric middle of each span
        ax.plot(mids, c["loss"], color=colour, linestyle="--" if c["carry"] else "-", marker="o", markersize=3,
                linewidth=1.6, label=name)
    first = next(iter(curves.values()))
    for x, label in ((first["window"], "sliding window"), (first.get("train_window"), "training window")):
        if x:
            ax.axvline(x, color="#888", linestyle=":", linewidth=1)
            ax.text(x, ax.get_ylim()[1], f" {label}", fontsize=7, va="top", color="#555")
    ax.set_xscale("log")
    ax.set_xlabel("position in the document (tokens)")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title("long context: loss by position (dashed: state carried across windows)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_rpt_accuracy(runs: list[Run], path: Path) -> bool:
    """RPT's held-out next-token accuracy per entropy bucket, against the step, one line per run
    (with 95% Wilson intervals over the bucket's positions)."""
    series = {r.name: [p for p in r.points if p.get("eval/rpt_acc_easy") is not None] for r in runs}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return False
    fig, axes = plt.subplots(1, len(RPT_BUCKETS), figsize=(4.2 * len(RPT_BUCKETS), 3.4), dpi=100, sharey=True)
    for ax, (bucket, rule) in zip(axes, RPT_BUCKETS.items()):
        key, n_key = f"eval/rpt_acc_{bucket}", f"eval/rpt_n_{bucket}"
        for name, points in series.items():
            pts = [(p["step"], p[key], p.get(n_key, 0)) for p in points if p.get(key) is not None and math.isfinite(p[key])]
            if not pts:
                continue
            steps, accs, ns = zip(*pts)
            ci = [wilson_interval(round(a * n), n) for a, n in zip(accs, ns)]
            line = ax.plot(steps, accs, marker="o", markersize=3, linewidth=1.6, label=f"{name} (n={ns[-1]})")[0]
            ax.fill_between(steps, [lo for lo, _ in ci], [hi for _, hi in ci], color=line.get_color(), alpha=0.15)
        ax.set_title(f"RPT next-token accuracy, {bucket} (proxy entropy {rule} nats)", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("held-out accuracy")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_seed_bands(root: Path, y: str, path: Path) -> bool:
    """y against data tokens, the mean over seeds with its 95% interval as a band, one line per arm."""
    curves = seed_grid.curves(root, y)
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for name, (xs, mean, low, high) in curves.items():
        line = ax.plot(xs, mean, marker="o", markersize=3, linewidth=1.8, label=name)[0]
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.18)
    return save_log_x(fig, ax, f"{QUALITY[y].split(' (')[0]}: mean and 95% interval over seeds", AXES["tokens/data"],
                      QUALITY[y], path)


def seed_tables(grid: dict) -> str:
    """The comparison across seeds (training/seed_grid.py) as HTML tables."""
    if not grid["seeds"]:
        return ""
    parts = [f"<h2>Across seeds {grid['seeds']}</h2>"]
    for title, header, rows in seed_grid.tables(grid):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
        parts.append(f"<h3>{html.escape(title)}</h3><table><tr>{head}</tr>{body}</table>")
    return "\n".join(parts)


def long_context_table(curves: dict[str, dict]) -> str:
    """Mean loss within the sliding window, beyond it, and beyond the training window, per run."""
    if not curves:
        return ""
    first = next(iter(curves.values()))
    window, train = first["window"], first.get("train_window") or first["window"]
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{mean_loss(c, end=window):.4f}</td>"
                   f"<td>{mean_loss(c, window):.4f}</td><td>{mean_loss(c, train):.4f}</td></tr>"
                   for name, c in curves.items())
    return ("<h2>Long context</h2><table><tr><th>run</th><th>loss within the window (&lt; "
            f"{window})</th><th>beyond the window (&ge; {window})</th><th>beyond the training window (&ge; {train})"
            f"</th></tr>{rows}</table>")


def thought_tables(runs: list[Run]) -> str:
    """Sampled thoughts at the first and the last RLP step of every run, with a loud warning when the
    base could not think (few thoughts closed at the first step)."""
    parts = []
    for run in runs:
        path = run.path / "thoughts.jsonl"
        if not path.is_file():
            continue
        steps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        records = [m for m in read_metrics(run.path / "metrics.jsonl") if m.get("rlp/closed_frac") is not None]
        if records and records[0]["rlp/closed_frac"] < CLOSED_FRAC_WARNING:
            parts.append(f'<p class="warn">WARNING ({html.escape(run.name)}): the policy closed only '
                         f"{records[0]['rlp/closed_frac']:.0%} of its thoughts at the first RLP step: its base cannot "
                         "think. Start RLP from a base trained on thoughts (pretrain.augment=think).</p>")
        for label, entry in (("first", steps[0]), ("last", steps[-1])) if steps else ():
            rows = "".join(
                f"<tr><td>{html.escape(e['context'][-60:])}</td><td>{html.escape(e['next_token'])}</td>"
                f"<td>{html.escape(t['text'])}</td><td>{_fmt(t['reward'], '+.3f')}</td><td>{'yes' if t['closed'] else 'forced'}</td></tr>"
                for e in entry["examples"] for t in e["thoughts"])
            parts.append(f"<h3>{html.escape(run.name)}: thoughts at the {label} RLP step ({entry['step']})</h3>"
                         "<table class=\"thoughts\"><tr><th>context (end)</th><th>true next token</th><th>thought</th>"
                         f"<th>reward</th><th>closed</th></tr>{rows}</table>")
    return "\n".join(parts)


def efficiency_table(runs: list[Run], baseline: str) -> tuple[list[dict], float | None]:
    base = next((r for r in runs if r.name == baseline or r.path.name == baseline), None)
    if base is None:
        return [], None
    target = base.points[-1]["eval/bpb"]
    base_tokens = tokens_to_reach(base, target)
    rows = []
    for run in runs:
        reached = tokens_to_reach(run, target)
        last = run.points[-1]
        rows.append({
            "run": run.name, "final_bpb": last["eval/bpb"], "final_task_acc": last.get("eval/task_acc"),
            "final_task_acc_think": last.get("eval/task_acc_think"), "final_answer_nll_think": last.get("eval/answer_nll_think"),
            "data_tokens": last.get("tokens/data"), "thought_tokens": last.get("tokens/thought", 0),
            "flops": last.get("flops/total"), "tokens_to_target": reached,
            "efficiency": (base_tokens / reached) if reached and base_tokens else None,
        })
    return rows, target


def _fmt(v, spec=",.0f", none="—"):
    return none if v is None else format(v, spec)


def write_html(runs: list[Run], rows: list[dict], target: float | None, baseline: str, pngs: list[Path], out: Path,
               extra: str = "") -> Path:
    thoughts = thought_tables(runs)
    images = "\n".join(
        f'<figure><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{html.escape(p.stem.replace('__', ' vs ').replace('_', ' '))}</figcaption></figure>"
        for p in pngs)
    table = ""
    if rows:
        head = ("<tr><th>run</th><th>final bpb</th><th>final task acc</th><th>task acc after a thought</th>"
                "<th>answer NLL after a thought</th><th>data tokens</th><th>thought tokens</th>"
                f"<th>FLOPs</th><th>data tokens to reach {baseline}'s final bpb ({target:.4f})</th>"
                "<th>data efficiency vs baseline</th></tr>")
        body = "\n".join(
            f"<tr><td>{html.escape(r['run'])}</td><td>{r['final_bpb']:.4f}</td><td>{_fmt(r['final_task_acc'], '.3f')}</td>"
            f"<td>{_fmt(r['final_task_acc_think'], '.3f')}</td><td>{_fmt(r['final_answer_nll_think'], '.3f')}</td>"
            f"<td>{_fmt(r['data_tokens'])}</td><td>{_fmt(r['thought_tokens'])}</td><td>{_fmt(r['flops'], '.3g')}</td>"
            f"<td>{_fmt(r['tokens_to_target'], ',.0f', 'not reached')}</td><td>{_fmt(r['efficiency'], '.2f')}{'×' if r['efficiency'] else ''}</td></tr>"
            for r in rows)
        table = f"<table>{head}{body}</table>"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Ponder: data efficiency</title>
<style>body{{font-family:sans-serif;margin:24px;color:#222}}figure{{display:inline-block;width:46%;margin:8px}}
img{{width:100%}}
table{{border-collapse:collapse;margin-top:12px}}td,th{{border:1px solid #bbb;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}
table.thoughts td{{text-align:left;font-family:monospace;white-space:pre-wrap;max-width:420px}}
.warn{{color:#b00;font-weight:bold}}</style></head>
<body><h1>Data efficiency</h1>
<p>Held-out quality on original documents against the corpus tokens each run trained on (thinking
tokens, generated or appended, are counted apart) and against training FLOPs. {len(runs)} runs.</p>
{table}
{extra}
{images}
{thoughts}
</body></html>
"""
    path = out / "index.html"
    path.write_text(page)
    return path


def log_to_wandb(runs: list[Run], mode: str, out: Path) -> None:
    import wandb

    run = wandb.init(project="ponder", name="data-efficiency", dir=str(out), mode=mode, job_type="report")
    for y in QUALITY:
        for x in AXES:
            xs_list, ys_list, keys = [], [], []
            for r in runs:
                xs, ys = r.curve(x, y)
                if xs:
                    xs_list.append(xs)
                    ys_list.append(ys)
                    keys.append(r.name)
            if keys:
                # line_series wants one shared x; log each run's curve as its own table instead.
                for name, xs, ys in zip(keys, xs_list, ys_list):
                    table = wandb.Table(data=list(zip(xs, ys)), columns=[x, y])
                    run.log({f"report/{y}__{x}/{name}": wandb.plot.line(table, x, y, title=f"{name}: {y} vs {x}")})
    run.finish()


def main(argv: list[str]) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, help="a folder of runs (searched recursively for metrics.jsonl)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <runs>/report)")
    p.add_argument("--baseline", default="ntp_plain", help="the run whose final quality sets the target")
    p.add_argument("--wandb", default="offline", choices=["offline", "online", "disabled"])
    args = p.parse_args(argv)
    if not args.runs.is_dir():
        raise SystemExit(f"report: {args.runs} is not a folder of runs")
    runs = find_runs(args.runs)
    if not runs:
        raise SystemExit(f"report: no metrics.jsonl with evaluations under {args.runs}")
    out = args.out or args.runs / "report"
    out.mkdir(parents=True, exist_ok=True)
    pngs = []
    for y in QUALITY:
        for x in AXES:
            path = out / f"{y.split('/')[1]}__{x.split('/')[0]}.png"
            if plot(runs, x, y, path):
                pngs.append(path)
    if plot_diagnostics(runs, out / "rlp_diagnostics.png"):
        pngs.append(out / "rlp_diagnostics.png")
    long_context = args.runs / "long_context.json"
    curves = json.loads(long_context.read_text()) if long_context.is_file() else {}
    if plot_long_context(curves, out / "long_context.png"):
        pngs.append(out / "long_context.png")
    if plot_rpt_accuracy(runs, out / "rpt_accuracy.png"):
        pngs.append(out / "rpt_accuracy.png")
    grid = seed_grid.summarize(args.runs)
    for y in ("eval/bpb", "eval/task_acc_think", "eval/answer_nll_think") if grid["seeds"] else ():
        path = out / f"seeds_{y.split('/')[1]}.png"
        if plot_seed_bands(args.runs, y, path):
            pngs.append(path)
    rows, target = efficiency_table(runs, args.baseline)
    page = write_html(runs, rows, target, args.baseline, pngs, out,
                      extra=long_context_table(curves) + seed_tables(grid))
    if args.wandb != "disabled":
        log_to_wandb(runs, args.wandb, out)
    for r in rows:
        print(f"{r['run']:>12}: final bpb {r['final_bpb']:.4f}, data tokens to reach {args.baseline}'s final bpb: "
              f"{_fmt(r['tokens_to_target'], ',.0f', 'not reached')} ({_fmt(r['efficiency'], '.2f')}{'x' if r['efficiency'] else ''})")
    print(f"dashboard: {page} (and {len(pngs)} PNGs beside it)")
    return page


if __name__ == "__main__":
    main(sys.argv[1:])
