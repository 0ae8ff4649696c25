"""The data-efficiency report: the table's arithmetic on runs with a known answer, the HTML and
PNGs it writes, and the page as a browser renders it."""

import json
import shutil
import subprocess

import numpy as np
import pytest

import pipelines.report as report


def write_run(path, points, base_points=None):
    path.mkdir(parents=True)
    with open(path / "metrics.jsonl", "w") as f:
        for step, (tokens, bpb) in enumerate(points):
            f.write(json.dumps({"step": step, "tokens/data": tokens, "flops/total": 6e6 * tokens, "eval/bpb": bpb,
                                "eval/task_acc": 0.1 * step}) + "\n")
            f.write(json.dumps({"step": step, "train/loss": 1.0}) + "\n")  # records without evaluations are skipped
    if base_points:
        write_run(path / "base", base_points)


@pytest.fixture
def runs(tmp_path):
    # The baseline ends at bpb 1.0 after 1000 tokens; "fast" reaches 1.0 at 500 (2x as data-efficient);
    # "never" stays above; "stitched" is an RLP run whose base/ pretraining holds its first points.
    write_run(tmp_path / "ntp_plain", [(0, 3.0), (250, 2.0), (1000, 1.0)])
    write_run(tmp_path / "fast", [(0, 3.0), (250, 1.5), (500, 1.0), (1000, 0.8)])
    write_run(tmp_path / "never", [(0, 3.0), (1000, 1.5)])
    write_run(tmp_path / "stitched", [(600, 1.2), (900, 1.1)], base_points=[(0, 3.0), (600, 1.2)])
    return tmp_path


def test_efficiency_table_on_known_curves(runs):
    found = {r.name: r for r in report.find_runs(runs)}
    assert sorted(found) == ["fast", "never", "ntp_plain", "stitched"]  # base/ folded into its run
    assert [p["tokens/data"] for p in found["stitched"].points] == [0, 600, 600, 900]
    rows, target = report.efficiency_table(list(found.values()), "ntp_plain")
    by = {r["run"]: r for r in rows}
    assert target == 1.0
    assert by["ntp_plain"]["tokens_to_target"] == pytest.approx(1000)
    assert by["fast"]["tokens_to_target"] == pytest.approx(500) and by["fast"]["efficiency"] == pytest.approx(2.0)
    assert by["never"]["tokens_to_target"] is None and by["never"]["efficiency"] is None
    # Interpolation is linear in log tokens: halfway from 2.0 to 1.0 between 250 and 1000 tokens is 500.
    assert report.tokens_to_reach(found["ntp_plain"], 1.5) == pytest.approx(500)


def test_report_writes_html_and_pngs(runs, capsys):
    page = report.main([str(runs), "--wandb", "disabled"])
    html = page.read_text()
    assert html.count("<img") == 4  # bpb and task accuracy, against data tokens and against FLOPs
    assert "not reached" in html and "2.00×" in html
    assert sorted(p.name for p in page.parent.glob("*.png")) == [
        "bpb__flops.png", "bpb__tokens.png", "task_acc__flops.png", "task_acc__tokens.png"]
    assert "dashboard:" in capsys.readouterr().out


def test_report_rejects_an_empty_folder(tmp_path):
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        report.main([str(tmp_path), "--wandb", "disabled"])


def test_browser_renders_the_plots(runs, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium)")
    page = report.main([str(runs), "--wandb", "disabled"])
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1400,2000",
                    page.as_uri()], check=True, capture_output=True, timeout=120)
    import matplotlib.image

    pixels = (matplotlib.image.imread(shot)[..., :3] * 255).astype(int)
    # matplotlib's first two line colours (C0 blue, C1 orange) drawn in the plots, not just a page of text.
    for rgb in ((31, 119, 180), (255, 127, 14)):
        close = (np.abs(pixels - np.array(rgb)).sum(-1) < 40).sum()
        assert close > 200, (rgb, close)


def test_long_context_panel_from_measured_curves(runs):
    """long_context.json as pipelines/long_context.py writes it (curves measured on a tiny model):
    the panel is drawn, and the table's means are those of the curves' positions."""
    import torch

    from models import PonderConfig, PonderForCausalLM
    from training.long_context import measure, write_curves

    torch.manual_seed(0)
    model = PonderForCausalLM(PonderConfig(vocab_size=31, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=32, mode="swa", sliding_window=4)).eval()
    docs = torch.randint(0, 31, (3, 33)).tolist()
    curves = measure(model, docs, 32, 8, "swa", "cpu")
    write_curves(runs / "long_context.json", curves)
    page = report.main([str(runs), "--wandb", "disabled"]).read_text()
    assert (runs / "report" / "long_context.png").is_file() and page.count("<img") == 5
    carried = curves["swa +carry"]
    beyond = [y for (a, b), y in zip(carried["positions"], carried["loss"]) if a >= 4]
    spans = [b - a for a, b in carried["positions"] if a >= 4]
    assert f"{sum(w * y for w, y in zip(spans, beyond)) / sum(spans):.4f}" in page
    assert carried["loss"] != curves["swa"]["loss"]  # carrying the window changes what later windows see


def test_rpt_accuracy_panel_for_runs_that_log_it(tmp_path):
    write_run(tmp_path / "ntp_plain", [(0, 3.0), (1000, 1.0)])
    rpt = tmp_path / "rpt"
    rpt.mkdir()
    with open(rpt / "metrics.jsonl", "w") as f:
        for step, acc in ((0, 0.1), (10, 0.25)):
            f.write(json.dumps({"step": step, "tokens/data": 100 * step, "eval/bpb": 1.0, "eval/rpt_acc_easy": acc,
                                "eval/rpt_n_easy": 40, "eval/rpt_acc_medium": acc / 2, "eval/rpt_n_medium": 20,
                                "eval/rpt_acc_hard": float("nan"), "eval/rpt_n_hard": 0}) + "\n")
    assert report.plot_rpt_accuracy(report.find_runs(tmp_path), tmp_path / "rpt.png")
    assert not report.plot_rpt_accuracy([r for r in report.find_runs(tmp_path) if r.name == "ntp_plain"], tmp_path / "no.png")
    page = report.main([str(tmp_path), "--wandb", "disabled"])
    assert (page.parent / "rpt_accuracy.png").is_file() and 'alt="rpt_accuracy"' in page.read_text()
