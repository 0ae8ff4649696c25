"""The graph at scale on CPU: resource checks against the real cluster, N learner ranks in one
gloo group with FSDP2 against one plain learner, DCP checkpoints across rank counts."""

import dataclasses

import pytest
import torch

from models import PonderConfig, PonderForCausalLM
from rollout.rollouts import ThoughtSample
from training.config import CONFIG_DIR, RLPMidtrainConfig, load_config
from training.distributed import ResourceError, check_resources

THINK, END, V = 3, 4, 40


def test_resource_check_names_what_is_missing():
    groups = {"learner": [{"CPU": 1, "GPU": 1}] * 2, "rollout": [{"CPU": 0.5, "GPU": 0.5}] * 2}
    with pytest.raises(ResourceError, match=r"asks for 3 GPU \(learner 2, rollout 1\) but the cluster has 2 GPU"):
        check_resources(groups, {"CPU": 16, "GPU": 2}, [{"CPU": 16, "GPU": 2}])
    # Enough in all, but no node holds one rank's bundle.
    with pytest.raises(ResourceError, match=r"one learner actor asks for CPU 12, GPU 1 but no node has that much"):
        check_resources({"learner": [{"CPU": 12, "GPU": 1}]}, {"CPU": 16, "GPU": 2}, [{"CPU": 8, "GPU": 1}] * 2)
    check_resources(groups, {"CPU": 8, "GPU": 3}, [{"CPU": 8, "GPU": 3}])


def test_more_gpus_than_the_cluster_has_fail_before_any_actor(ray_cluster):
    ray = ray_cluster
    from training.graph import placement

    cfg = config(["learner.gpus_per_rank=1", "learner.num_ranks=2"])
    with pytest.raises(ResourceError, match=r"asks for 2 GPU \(learner 2, rollout 0\) but the cluster has 0 GPU"):
        placement(cfg)
    assert ray.util.placement_group_table() == {} or all(
        pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())


def config(extra=()):
    return load_config(RLPMidtrainConfig, CONFIG_DIR / "rlp_midtrain.yaml",
                       ["rlp.ema_decay=0.9", "optim.warmup_steps=0", "optim.lr=3e-4", "train.steps=10",
                        "rlp.min_context=4", "data.seq_len=24", "train.eval_windows=2", "learner.cpus_per_rank=0.5",
                        "rollout.cpus_per_worker=0.5", *extra])


def tiny_base(path, mode, vocab=V):
    torch.manual_seed(0)
    PonderForCausalLM(PonderConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                   intermediate_size=64, mode=mode, sliding_window=16, mini_batch_size=8,
                                   eos_token_id=5)).save_pretrained(path)


def batch(seed=0):
    """4 windows (a few end-of-document ids among them: masked targets differ across ranks) and
    5 thoughts (split 3 + 2 over two ranks)."""
    g = torch.Generator().manual_seed(seed)
    windows = torch.randint(5, V, (4, 25), generator=g)
    samples = []
    for i in range(5):
        thought = torch.randint(6, V, (2 + i % 3,), generator=g).tolist() + [END]
        samples.append(ThoughtSample(torch.randint(6, V, (6 + i,), generator=g).tolist(), thought,
                                     (-torch.rand(len(thought), generator=g) * 3).tolist(), (-1.0) ** i * 0.5, 0.0))
    return windows, samples


def rollouts(samples):
    from rollout.rollouts import Rollouts

    return [Rollouts(version=0, samples=samples, rewards=[s.reward for s in samples])]


def learner_args(cfg, tmp_path, run):
    return (cfg, str(tmp_path / "base"), str(tmp_path / run), torch.randint(5, V, (2, 25)),
            torch.ones(V, dtype=torch.long), THINK, 0)


@pytest.fixture
def learners(ray_cluster):
    """Starts learner groups (and tracks other actors) for one test, and removes them all at its
    end, passed or failed, so a failure leaves the module's cluster free for the next test."""

    class Learners:
        def __init__(self):
            self.groups, self.actors = [], []

        def start(self, cfg, tmp_path, run, ranks=2):
            from training.distributed import place
            from training.learner_group import learner_bundles, start_learners

            cfg = dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, num_ranks=ranks))
            pg = place(learner_bundles(cfg), "pack", 60, "learner ranks")
            self.groups.append(start_learners(cfg, pg, *learner_args(cfg, tmp_path, run)))
            return self.groups[-1]

        def stop(self, g):
            for r in g.ranks:
                ray_cluster.kill(r)
            ray_cluster.util.remove_placement_group(g.placement)
            self.groups.remove(g)

    made = Learners()
    yield made
    for a in made.actors:
        ray_cluster.kill(a)
    for g in list(made.groups):
        made.stop(g)


def max_rel_err(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k].float() - b[k].float()).norm() / b[k].float().norm()).item() for k in a)


@pytest.mark.parametrize("mode", ["ttt_e2e", "full"])
def test_two_ranks_step_as_one(ray_cluster, learners, tmp_path, mode):
    """One step on a global batch (next-token and RLP terms) by 2 FSDP ranks equals one plain
    learner's step on the same batch: policy and EMA. (At lr 1e-2 Adam's first step, ±lr where a
    gradient is near 0, turns float-rounding differences in the reduced gradient into ~1.6e-5.)"""
    from training.learner import Learner

    tiny_base(tmp_path / "base", mode)
    cfg = config([f"model.mode={mode}"])
    windows, samples = batch()
    two = learners.start(cfg, tmp_path, "two")
    ref = two.train_step.remote(rollouts(samples), windows)
    one = Learner(*learner_args(cfg, tmp_path, "one"))
    before = {k: v.clone() for k, v in one.model.state_dict().items()}
    m1 = one.train_step(rollouts(samples), windows)
    m2 = two.get(ref)
    policy, ema, version = two.get(two.weights.options(num_returns=3).remote())
    two.check()
    p1, e1, _ = one.weights()
    assert version == 1 and m2["rlp/samples"] == 5 and "train/loss_rlp" in m2
    assert max_rel_err(p1, before) > 1e-3  # the step moved the weights
    err = max_rel_err(policy, p1)
    print(f"{mode}: max relative error of 2 ranks vs 1: policy {err:.2e}, ema {max_rel_err(ema, e1):.2e}; "
          f"loss {m2['train/loss']:.6f} vs {m1['train/loss']:.6f}")
    assert err <= 1e-5 and max_rel_err(ema, e1) <= 1e-5
    assert m2["train/loss"] == pytest.approx(m1["train/loss"], rel=1e-5)
    assert m2["train/grad_norm"] == pytest.approx(m1["train/grad_norm"], rel=1e-4)
    assert m2["tokens/data"] == m1["tokens/data"]
    learners.stop(two)


@pytest.mark.slow
def test_checkpoint_of_two_ranks_resumes_on_one_and_two(ray_cluster, learners, tmp_path):
    """DCP checkpoints: 2 ranks write, 1 and 2 ranks resume and take the step the writer took next;
    then 1 rank writes and 2 resume."""
    from transformers import AutoModelForCausalLM

    from training.checkpoint import check_model_dir
    from training.learner import Learner

    tiny_base(tmp_path / "base", "ttt_e2e")
    cfg = config()
    (w1, s1), (w2, s2) = batch(1), batch(2)
    two = learners.start(cfg, tmp_path, "run")
    two.get(two.train_step.remote(rollouts(s1), w1))
    two.get(two.save.remote({"loader": 7}))
    check_model_dir(tmp_path / "run" / "model")  # one save_pretrained dir, gathered
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").state_dict()
    policy = two.get(two.weights.options(num_returns=3).remote()[0])
    assert saved.keys() == policy.keys() and all(torch.equal(saved[k], policy[k]) for k in saved)
    assert (tmp_path / "run" / "checkpoints" / "step_00000001" / "dcp" / ".metadata").is_file()
    two.get(two.train_step.remote(rollouts(s2), w2))  # the run goes on: what both resumes must reproduce
    expected = two.get(two.weights.options(num_returns=3).remote()[0])
    learners.stop(two)

    again = learners.start(cfg, tmp_path, "run")
    assert again.get(again.resume.remote()) == {"version": 1, "loader": 7}
    again.get(again.train_step.remote(rollouts(s2), w2))
    on_two = again.get(again.weights.options(num_returns=3).remote()[0])
    learners.stop(again)
    one = Learner(*learner_args(cfg, tmp_path, "run"))
    assert one.resume() == {"version": 1, "loader": 7}
    one.train_step(rollouts(s2), w2)
    on_one = one.weights()[0]
    print(f"resumed on 2 ranks: {max_rel_err(on_two, expected):.2e}, on 1: {max_rel_err(on_one, expected):.2e}")
    assert max_rel_err(on_two, expected) <= 1e-6 and max_rel_err(on_one, expected) <= 1e-5

    one.save({"loader": 8})  # and back: one rank's checkpoint, resumed on two
    policy, ema, _ = one.weights()
    two = learners.start(cfg, tmp_path, "run")
    assert two.get(two.resume.remote()) == {"version": 2, "loader": 8}
    got = two.get(two.weights.options(num_returns=3).remote()[:2])
    assert all(torch.equal(got[0][k], policy[k]) and torch.equal(got[1][k], ema[k]) for k in policy)
    learners.stop(two)


def test_weights_cross_the_object_store_as_numpy_bit_for_bit(ray_cluster):
    """sync.method=object_store sends state dicts as numpy arrays (bfloat16 as its int16 bits): what a
    worker reads back from Ray's object store is the learner's tensors, bit for bit, dtype for dtype."""
    import ray

    from rollout.sync import from_wire, to_wire

    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(64, 32, generator=g), "h": torch.randn(7, generator=g).to(torch.bfloat16),
             "d": torch.randn(3, 3, generator=g, dtype=torch.float64), "step": torch.tensor([5, -2])}
    back = from_wire(ray.get(ray.put(to_wire(state))))
    assert back.keys() == state.keys()
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert from_wire(state) == state  # tensors pass through


@pytest.mark.parametrize("workers,ranks", [(1, 1), (2, 2)])
def test_collective_sync_gives_every_engine_the_learners_weights(ray_cluster, learners, tmp_path, workers, ranks):
    """Learner rank 0 broadcasts policy and EMA in many small buckets; every engine ends with
    exactly the learner's tensors and version."""
    ray = ray_cluster
    from rollout.sync import CollectiveSync
    from rollout.worker import RolloutWorker
    from training.tokenizer import train_tokenizer

    tok = train_tokenizer([f"what is {i} + {i * 3}? {i * 4}" for i in range(100)], vocab_size=280)
    tok.save_pretrained(tmp_path / "tok")
    tiny_base(tmp_path / "base", "ttt_e2e", vocab=len(tok))
    cfg = config()
    learner = learners.start(cfg, tmp_path, "run", ranks=ranks)
    engines = [ray.remote(RolloutWorker).options(num_cpus=0.5).remote(
        str(tmp_path / "base"), str(tmp_path / "tok"), cfg.rlp, cfg.reward, i) for i in range(workers)]
    learners.actors.extend(engines)
    sync = CollectiveSync(learner, engines, bucket_mb=0.01, timeout_s=120)  # ~10 KB buckets: dozens of broadcasts
    windows, samples = batch()
    for step in range(2):
        learner.get(learner.train_step.remote(rollouts(samples), windows))
        sync.push()
    policy, ema, version = learner.get(learner.weights.options(num_returns=3).remote())
    assert version == 2 and max_rel_err(policy, ema) > 1e-4  # two different models travelled
    for e in engines:
        assert ray.get(e.versions.remote()) == (2, 2)
        for mine, theirs in ((ray.get(e.weights.remote()), policy), (ray.get(e.weights.remote(teacher=True)), ema)):
            assert mine.keys() == theirs.keys()
            for k in mine:
                assert torch.equal(mine[k], theirs[k]), k


@pytest.mark.slow
def test_pipeline_with_two_ranks_two_workers_and_collective_sync(tmp_path):
    """pipelines/rlp_midtrain.py end to end on a local cluster: 2 learner ranks, 2 workers, weights
    by broadcast; model/ and a sharded checkpoint come out. Asking for a GPU fails in one line."""
    from tests.test_resume import finish, pipeline
    from training.checkpoint import check_model_dir
    from training.metrics import read_metrics

    scale = ["learner.num_ranks=2", "rollout.num_workers=2", "sync.method=collective", "learner.cpus_per_rank=0.5",
             "rollout.cpus_per_worker=0.5", "pretrain.steps=10", "train.steps=4", "train.save_every=2"]
    out = finish(pipeline(tmp_path, "run_name=scale", *scale))
    records = read_metrics(tmp_path / "scale" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(5)) and all(r["rlp/samples"] > 0 for r in records[1:])
    check_model_dir(tmp_path / "scale" / "model")
    assert (tmp_path / "scale" / "checkpoints" / "step_00000004" / "dcp" / ".metadata").is_file()
    assert "config error" not in out

    proc = pipeline(tmp_path, "run_name=gpu", *scale, "learner.gpus_per_rank=1")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "config error: the config asks for 2 GPU" in out and "has 0 GPU" in out, out[-2000:]
    assert not (tmp_path / "gpu" / "base").exists()  # failed before pretraining anything


def test_bf16_mixed_precision_keeps_fp32_master_weights(ray_cluster, learners, tmp_path):
    """dtype=bfloat16 with 2 ranks: bf16 compute (the step differs from fp32's, a little), fp32
    master weights and reduction."""
    from training.learner import Learner

    tiny_base(tmp_path / "base", "ttt_e2e")
    windows, samples = batch()
    two = learners.start(config(["dtype=bfloat16"]), tmp_path, "bf16")
    m2 = two.get(two.train_step.remote(rollouts(samples), windows))
    policy = two.get(two.weights.options(num_returns=3).remote()[0])
    learners.stop(two)
    one = Learner(*learner_args(config(), tmp_path, "fp32"))
    m1 = one.train_step(rollouts(samples), windows)
    err = max_rel_err(policy, one.weights()[0])
    print(f"bf16 vs fp32: loss {m2['train/loss']:.5f} vs {m1['train/loss']:.5f}, parameters {err:.1e}")
    assert all(t.dtype == torch.float32 for t in policy.values())
    assert m2["train/loss"] == pytest.approx(m1["train/loss"], rel=1e-3)
    assert 1e-5 < err < 2e-2
