"""The statistics across seeds (training/stats.py, training/seed_grid.py) on cases with known answers,
and the FLOP matching of compare.py's cpt_flops arm."""

import json
import math

import pytest

import pipelines.compare as compare
from training import seed_grid
from training.config import CompareConfig, ConfigError
from training.stats import betainc, fisher_exact, mean_ci, paired_test, t_quantile, t_two_sided_p


def test_student_t_matches_closed_forms():
    for t in (0.3, 1.0, 2.5, 9.0):
        assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, rel=1e-10)  # Cauchy
        assert t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-10)
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-8)
    assert t_quantile(0.975, 2) == pytest.approx(4.302652729749464, rel=1e-8)
    assert betainc(1.0, 1.0, 0.37) == pytest.approx(0.37, rel=1e-12)  # the uniform distribution
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248, rel=1e-10)  # 1 - (1-x)^4 - 4x(1-x)^3


def test_mean_interval_and_paired_test_by_hand():
    iv = mean_ci([1.0, 2.0, 3.0])  # mean 2, sd 1
    half = 4.302652729749464 / math.sqrt(3)
    assert (iv.mean, iv.low, iv.high) == pytest.approx((2.0, 2 - half, 2 + half), rel=1e-8)
    test = paired_test([11.0, 22.0, 33.0], [10.0, 20.0, 30.0])  # differences 1, 2, 3
    t = 2 / (1 / math.sqrt(3))
    assert test.t == pytest.approx(t) and test.p == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-8)
    assert test.diff.low == pytest.approx(2 - half)
    assert paired_test([1.0, 2.0], [1.0, 2.0]).p == 1.0  # no difference at all
    assert math.isnan(paired_test([1.0], [0.0]).p)  # one seed: no test
    with pytest.raises(ValueError):
        paired_test([1.0], [1.0, 2.0])


def test_fisher_exact_known_tables():
    assert fisher_exact(3, 4, 1, 4) == pytest.approx(34 / 70)  # the lady tasting tea
    assert fisher_exact(2, 2, 0, 2) == pytest.approx(1 / 3)  # probabilities 1/6, 4/6, 1/6
    assert fisher_exact(0, 10, 0, 10) == 1.0
    # The extreme table of 6 solved, all in one arm of 6 and 6: C(6,6)C(6,0)/C(12,6), both tails.
    assert fisher_exact(6, 6, 0, 6) == pytest.approx(2 / math.comb(12, 6))


def write_run(path, records, **extra):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for name, value in extra.items():
        (path / name).write_text(json.dumps(value))


def test_seed_grid_pairs_arms_seed_by_seed(tmp_path):
    """Three seeds where rlp's bpb is cpt's minus 0.01, 0.02, 0.03 and rlp solves 5, 6, 7 of 100
    problems to cpt's 1: the paired test and the pooled Fisher test give the hand-computed values."""
    for seed in range(3):
        root = tmp_path / f"seed_{seed}"
        write_run(root / "base_ttt", [{"step": 0, "eval/bpb": 1.0, "tokens/data": 1000, "flops/total": 1e9}])
        write_run(root / "base_ttt" / "model", [])
        cpt = 0.9 - 0.1 * seed
        write_run(root / "cpt", [{"step": 10, "eval/bpb": cpt, "eval/task_acc_think": 0.01, "eval/task_problems": 100,
                                  "tokens/data": 2000, "flops/total": 2e9}])
        write_run(root / "rlp", [{"step": 1, "rlp/reward_mean": -1.0 - seed},
                                 {"step": 10, "eval/bpb": cpt - 0.01 * (seed + 1), "eval/task_acc_think": (5 + seed) / 100,
                                  "eval/task_problems": 100, "tokens/data": 2000, "flops/total": 7e9,
                                  "rlp/reward_mean": -0.5 - seed}],
                  **{"task_eval_think8.json": {"think_tokens": 8, "eval/task_acc_think": 0.5, "eval/answer_nll": 9.0}})
        # a killed first attempt that the restarted compare moved aside: not an arm
        write_run(root / "rlp.20261204-213044", [{"step": 10, "eval/bpb": 5.0, "tokens/data": 2000, "flops/total": 7e9}])
    grid = seed_grid.summarize(tmp_path)
    assert grid["seeds"] == [0, 1, 2] and set(grid["runs"]) == {"base_ttt", "cpt", "rlp"}
    bpb = next(p for p in grid["pairs"] if p["metric"] == "eval/bpb")
    expected = paired_test([-0.01, -0.02, -0.03], [0.0, 0.0, 0.0])
    assert bpb["diff"]["mean"] == pytest.approx(-0.02) and bpb["p"] == pytest.approx(expected.p)
    pooled = next(p for p in grid["pairs"] if p["metric"] == "pooled task acc after a thought")
    assert pooled["solved"] == [18, 300, 3, 300] and pooled["p"] == pytest.approx(fisher_exact(18, 300, 3, 300))
    rlp = grid["runs"]["rlp"][1]
    assert rlp["gain/first"] == -2.0 and rlp["gain/last"] == -1.5 and rlp["gain/change"] == 0.5
    assert rlp["phase/flops/total"] == pytest.approx(6e9) and rlp["phase/tokens/data"] == 1000
    assert rlp["eval/task_acc_think@8"] == 0.5 and "eval/answer_nll@8" not in rlp  # only what thoughts change
    text = seed_grid.markdown(grid)
    assert "rlp − cpt" in text and "18/300 vs 3/300" in text
    assert set(seed_grid.curves(tmp_path, "eval/bpb")) == {"base_ttt", "cpt", "rlp"}


def test_cpt_flops_reads_rlp_flops_per_cpt_token(tmp_path):
    out = tmp_path / "cmp"
    write_run(out / "base_ttt", [{"step": 5, "eval/bpb": 1.0, "tokens/data": 1000, "flops/total": 1e9}])
    (out / "base_ttt" / "model").mkdir()
    write_run(out / "cpt", [{"step": 10, "eval/bpb": 0.9, "tokens/data": 3000, "flops/total": 3e9}])  # 1e6 per token
    write_run(out / "rlp", [{"step": 10, "eval/bpb": 0.9, "tokens/data": 3000, "flops/total": 12e9}])  # 11e9 spent
    cfg = CompareConfig(out_dir=str(out))
    assert compare.flops_matched_tokens(cfg) == 11_000
    with pytest.raises(ConfigError, match="cpt_x"):
        compare.flops_matched_tokens(CompareConfig(out_dir=str(out), tag="x"))
