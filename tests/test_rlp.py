"""RLP: the policy loss, the EMA teacher, the reward on a model trained to copy, and the Ray graph
(two rollout workers and a learner) end to end."""

import contextlib
import copy
import time

import pytest
import torch
import torch.nn.functional as F

from models import PonderConfig, PonderForCausalLM
from rewards import RewardInput, get_reward
from rollout.torch_engine import TorchEngine
from rollout.rollouts import Rollouts, ThoughtSample
from rollout.worker import choose_positions
from training.config import CONFIG_DIR, ConfigError, RLPMidtrainConfig, load_config
from training.losses import rlp_policy_loss, thought_batch

THINK, END = 3, 4  # ids of <think> and </think> in these synthetic vocabularies


def test_policy_gradient_touches_thought_tokens_only():
    samples = [ThoughtSample([7, 8, 9], [10, 11, END], [-1.0, -2.0, -0.5], 0.7, 0.1),
               ThoughtSample([7, 8], [12, END], [-1.5, -0.3], -0.7, -0.1)]
    ids, mask, old, adv = thought_batch(samples, THINK, pad_id=0)
    assert ids.tolist() == [[7, 8, 9, THINK, 10, 11, END], [7, 8, THINK, 12, END, 0, 0]]
    # The logits at <think> predict the first thought token; context, <think> and padding get none.
    assert mask.tolist() == [[0, 0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0, 0]]
    logits = torch.randn(2, 7, 16, requires_grad=True)
    # On-policy (ratio 1, nothing clipped): every thought token must get a gradient.
    next_ids = torch.cat([ids[:, 1:], ids[:, :1]], 1)
    old = torch.log_softmax(logits.detach() / 0.7, -1).gather(-1, next_ids[..., None])[..., 0] * mask
    loss, _ = rlp_policy_loss(logits, ids, mask, old, adv, temperature=0.7, clip_low=0.2, clip_high=0.2)
    loss.backward()
    touched = logits.grad.abs().sum(-1) > 0
    assert torch.equal(touched, mask)


def test_clipped_surrogate_by_hand():
    ids = torch.tensor([[5, THINK, 6, END]])
    mask = torch.tensor([[False, True, True, False]])
    logits = torch.zeros(1, 4, 8)
    logits[0, 1, 6], logits[0, 2, END] = 2.0, -1.0
    logp = torch.log_softmax(logits / 0.5, -1)
    new = torch.tensor([logp[0, 1, 6], logp[0, 2, END]])
    old = torch.zeros(1, 4)
    old[0, 1:3] = new + torch.tensor([0.5, -0.05])  # ratios e^-0.5 (clipped at 0.8) and e^0.05
    for a in (1.0, -1.0):
        loss, stats = rlp_policy_loss(logits, ids, mask, old, torch.tensor([a]), 0.5, 0.2, 0.2)
        r = torch.exp(torch.tensor([-0.5, 0.05]))
        expected = -torch.minimum(r * a, r.clamp(0.8, 1.2) * a).mean()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        assert stats["rlp/clip_frac"] == pytest.approx(0.5)


def test_is_cap_bounds_a_stale_tokens_weight():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 7, requires_grad=True)
    ids = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[False, True, True, False]])
    logp = F.log_softmax(logits.detach() / 0.5, -1)
    next_ids = torch.cat([ids[:, 1:], ids[:, :1]], 1)
    old = logp.gather(-1, next_ids[..., None])[..., 0] - 3.0  # sampled by a policy that found them far less likely
    adv = torch.tensor([-1.0])
    capped, _ = rlp_policy_loss(logits, ids, mask, old, adv, 0.5, 0.2, 0.2, is_cap=2.0)
    uncapped, _ = rlp_policy_loss(logits, ids, mask, old, adv, 0.5, 0.2, 0.2)
    assert capped.item() == pytest.approx(2.0)  # -mean(min(2·(-1), 1.2·(-1))) = 2
    assert uncapped.item() == pytest.approx(float(torch.exp(torch.tensor(3.0))), rel=1e-5)  # e^3: unbounded
    capped.backward()
    assert logits.grad.abs().sum() == 0  # at the cap the stale tokens push nothing


def test_ema_lags_as_tau_says(tmp_path):
    from training.learner import Learner

    torch.manual_seed(0)
    model = PonderForCausalLM(PonderConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=48))
    model.save_pretrained(tmp_path / "m")
    cfg = load_config(RLPMidtrainConfig, CONFIG_DIR / "rlp_midtrain.yaml", ["rlp.ema_decay=0.9", "model.mode=full"])
    learner = Learner(cfg, str(tmp_path / "m"), str(tmp_path / "run"), torch.randint(0, 32, (2, 9)),
                      torch.ones(32, dtype=torch.long), THINK, 0)
    phi0 = copy.deepcopy(learner.ema.state_dict())
    windows = torch.randint(5, 32, (2, 17))
    learner.train_step([], windows)
    theta1 = learner.model.state_dict()
    for name, phi in learner.ema.state_dict().items():
        torch.testing.assert_close(phi, 0.9 * phi0[name] + 0.1 * theta1[name])
    assert not torch.equal(learner.ema.state_dict()["embed.weight"], theta1["embed.weight"])
    assert learner.version == 1


def copy_model() -> PonderForCausalLM:
    """A tiny model trained on [context, <think>, thought, </think>, last thought token]: after a
    thought it predicts the thought's last token, i.e. a thought can carry the answer."""
    torch.manual_seed(0)
    model = PonderForCausalLM(PonderConfig(vocab_size=24, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=96))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        ctx = torch.randint(5, 24, (32, 4))
        thought = torch.randint(5, 24, (32, 3))
        seq = torch.cat([ctx, torch.full((32, 1), THINK), thought, torch.full((32, 1), END), thought[:, -1:]], 1)
        targets = torch.full_like(seq, -100)
        targets[:, -2] = seq[:, -1]  # only the answer after </think> is trained
        loss = model(seq, targets=targets).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_info_gain_prefers_the_thought_that_holds_the_next_token():
    model = copy_model()
    engine = TorchEngine(model)
    context, answer = [6, 9, 11, 7], 17
    thoughts = [[8, 10, answer, END], [8, 10, 12, END]]
    logp_with = engine.score([context + [THINK] + th for th in thoughts], [answer, answer]).tolist()
    logp_ema = engine.score([context], [answer]).item()
    inp = RewardInput(context_ids=context, target_ids=[answer], target_token_texts=["x"], thought_ids=thoughts,
                      thought_texts=["a", "b"], logp_with_thought=logp_with, logp_no_thought_ema=logp_ema)
    rewards = get_reward("rlp_info_gain")(inp)
    print(f"info gain: thought with the answer {rewards[0]:.3f}, without {rewards[1]:.3f}")
    assert rewards[0] > 0 > rewards[1]


def test_positions_respect_min_context():
    g = torch.Generator().manual_seed(0)
    picks = [t for _ in range(50) for t in choose_positions(32, 3, 10, g)]
    assert min(picks) >= 10 and max(picks) <= 32 and len(set(picks)) > 10


def test_unknown_reward_fails_at_start_listing_the_registered_ones():
    with pytest.raises(ConfigError, match=r"reward=nope.*rlp_info_gain.*rpt_prefix_match"):
        load_config(RLPMidtrainConfig, CONFIG_DIR / "rlp_midtrain.yaml", ["reward=nope"])


def small_graph(ray, tmp_path):
    """A Learner and two RolloutWorker actors (restartable) on a 4-layer TTT-E2E model, and 4 windows."""
    from rollout.worker import RolloutWorker
    from training.learner import Learner
    from training.tokenizer import train_tokenizer

    tok = train_tokenizer([f"Question: what is {i} + {i * 3}? Answer: {i * 4}" for i in range(200)], vocab_size=300)
    tok.save_pretrained(tmp_path / "tok")
    torch.manual_seed(0)
    model = PonderForCausalLM(PonderConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                           intermediate_size=64, mode="ttt_e2e", sliding_window=16, mini_batch_size=8))
    model.save_pretrained(tmp_path / "base")
    cfg = load_config(RLPMidtrainConfig, CONFIG_DIR / "rlp_midtrain.yaml",
                      ["rlp.group_size=3", "rlp.thought_max_tokens=5", "rlp.min_context=8", "data.seq_len=24",
                       "optim.warmup_steps=0", "train.steps=10"])
    think_open = tok.convert_tokens_to_ids("<think>")
    learner = ray.remote(Learner).options(num_cpus=1).remote(
        cfg, str(tmp_path / "base"), str(tmp_path / "run"), torch.randint(5, len(tok), (2, 25)),
        torch.ones(len(tok), dtype=torch.long), think_open, tok.pad_token_id)
    workers = [ray.remote(RolloutWorker).options(num_cpus=0.5, max_restarts=-1).remote(
        str(tmp_path / "base"), str(tmp_path / "tok"), cfg.rlp, cfg.reward, i) for i in range(2)]
    return learner, workers, torch.randint(5, len(tok), (4, 25))


def test_two_workers_and_a_learner_on_ray(ray_cluster, tmp_path):
    ray = ray_cluster
    from rollout.pool import RolloutPool
    from rollout.sync import ObjectStoreSync

    learner, workers, windows = small_graph(ray, tmp_path)
    pool = RolloutPool(workers, timeout_s=120, sync=ObjectStoreSync(learner, workers))
    first_batch = None
    for step in range(3):
        rollouts = ray.get([w.rollout.remote(s) for w, s in zip(workers, windows.chunk(2))])
        first_batch = first_batch or rollouts
        assert all(r.version == step for r in rollouts)
        rewards = [x for r in rollouts for x in r.rewards]
        assert len(rewards) == 4 * 3 and all(torch.isfinite(torch.tensor(rewards)))
        metrics = ray.get(learner.train_step.remote(rollouts, windows))
        assert metrics["rlp/samples"] == 12 and metrics["rollouts/dropped_stale"] == 0
        # Synchronous: the learner's log-probs of the thoughts are the engine's (ratio 1, no clip),
        # fast weights included.
        assert metrics["rlp/ratio_mean"] == pytest.approx(1.0, abs=1e-4) and metrics["rlp/clip_frac"] == 0
        last_batch = rollouts
        pool.sync.push()
    assert ray.get(learner.get_version.remote()) == 3
    learner_weights = ray.get(learner.weights.remote())[0]
    for w in workers:
        for name, tensor in ray.get(w.weights.remote()).items():
            assert torch.equal(tensor, learner_weights[name]), name
    # A batch sampled at version 0 is 3 versions old: with max_staleness=1 it is dropped.
    # One version behind (what asynchronous rollouts give): trained on, the ratio away from 1.
    metrics = ray.get(learner.train_step.remote(last_batch, windows))
    assert metrics["sync/version_lag"] == 1 and metrics["rollouts/dropped_stale"] == 0 and metrics["rlp/samples"] == 12
    assert metrics["rlp/ratio_mean"] != pytest.approx(1.0, abs=1e-6)
    # Sampled at version 0, now 4 versions old: past max_staleness=1, dropped and counted.
    metrics = ray.get(learner.train_step.remote(first_batch, windows))
    assert metrics["rollouts/dropped_stale"] == sum(len(r.samples) for r in first_batch)
    assert "rlp/clip_frac" not in metrics  # no policy-gradient term without fresh samples
    # A worker that dies idle: Ray starts it again from the base; before its next shard it loads the
    # weights last sent (version 3), and the pool counts the restart.
    ray.kill(workers[0], no_restart=False)
    rollouts = pool.gather(pool.submit(windows))
    assert [r.version for r in rollouts] == [3, 3] and pool.counters()["rollouts/worker_restarts"] == 1


def test_collective_sync_takes_back_a_worker_killed_idle_busy_or_before_a_push(ray_cluster, tmp_path):
    """sync.method=collective: a process group cannot take a restarted process back, so the sync
    forms a new one with the worker's new life. Whenever it dies, the new life samples with the
    weights the learner last sent (never the base's it starts from), and the restart is counted."""
    ray = ray_cluster
    from rollout.pool import RolloutPool
    from rollout.sync import CollectiveSync

    learner, workers, windows = small_graph(ray, tmp_path)
    sync = CollectiveSync(learner, workers, bucket_mb=0.01, timeout_s=120)
    pool = RolloutPool(workers, timeout_s=120, sync=sync)

    def step(kill=None):
        pending = pool.submit(windows)
        if kill is not None:  # while it samples
            ray.kill(workers[kill], no_restart=False)
        rollouts = pool.gather(pending)
        ray.get(learner.train_step.remote(rollouts, windows))
        return [r.version for r in rollouts]

    assert step() == [0, 0]
    sync.push()
    ray.kill(workers[0], no_restart=False)  # idle: its next life samples at the next step
    assert step() == [1, 1] and pool.counters()["rollouts/worker_restarts"] == 1 and sync.groups == 2
    sync.push()
    assert step(kill=1) == [2, 2] and pool.counters()["rollouts/worker_restarts"] == 2 and sync.groups == 3
    ray.kill(workers[0], no_restart=False)  # before the push: the group is formed again, then it sends
    while True:  # until its new life answers (a call may still reach the old one, or none while it restarts)
        with contextlib.suppress(ray.exceptions.ActorUnavailableError):
            if ray.get(workers[0].__ray_call__.remote(lambda w: w.sync is None)):
                break
    started = time.monotonic()
    sync.push()
    assert time.monotonic() - started < 60  # it did not wait out the sync's 120-s timeout
    assert sync.groups == 4 and step() == [3, 3] and pool.counters()["rollouts/worker_restarts"] == 3
    sync.push()
    learner_weights = ray.get(learner.weights.remote())[0]
    for w in workers:
        assert all(torch.equal(t, learner_weights[k]) for k, t in ray.get(w.weights.remote()).items())


def test_reward_that_raises_is_dropped_and_counted(ray_cluster, tmp_path):
    """A user reward loaded by dotted path that fails for every group: the run goes on."""
    from rollout.worker import RolloutWorker
    from training.tokenizer import train_tokenizer

    tok = train_tokenizer(["some words for a tokenizer"] * 20, vocab_size=280)
    tok.save_pretrained(tmp_path / "tok")
    PonderForCausalLM(PonderConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=48)).save_pretrained(tmp_path / "base")
    cfg = load_config(RLPMidtrainConfig, CONFIG_DIR / "rlp_midtrain.yaml",
                      ["rlp.group_size=2", "rlp.thought_max_tokens=3", "rlp.min_context=4", "data.seq_len=12"])
    worker = RolloutWorker(str(tmp_path / "base"), str(tmp_path / "tok"), cfg.rlp, "tests.broken_reward:always_raises", 0)
    out: Rollouts = worker.rollout(torch.randint(5, len(tok), (3, 13)))
    assert out.dropped == 3 * 2 and out.samples == [] and out.positions == 3
