"""Rewards: RLP information gain, group advantages, safe scoring, the registry, RPT prefix match."""

import pytest

from rewards import (
    Reward,
    RewardInput,
    extract_prediction,
    get_reward,
    group_advantages,
    prefix_match,
    register,
    registered_rewards,
    rlp_info_gain,
    rpt_first_token,
    rpt_prefix_match,
    rpt_prefix_match_trl,
    score_group,
)


def make_input(thought_texts=("a", "b", "c"), targets=(" 4", "2"), **logps) -> RewardInput:
    return RewardInput(
        context_ids=[1, 2, 3],
        target_ids=list(range(10, 10 + len(targets))),
        target_token_texts=list(targets),
        thought_ids=[[7] * (i + 1) for i in range(len(thought_texts))],
        thought_texts=list(thought_texts),
        **logps,
    )


# RLP


def test_rlp_info_gain_is_logp_difference_with_the_right_sign():
    inp = make_input(logp_with_thought=[-0.5, -2.0, -1.2], logp_no_thought_ema=-1.2)
    r = rlp_info_gain(inp)
    assert r == pytest.approx([0.7, -0.8, 0.0])
    assert r[0] > 0  # the thought raised log p of the true token
    assert r[1] < 0  # the thought lowered it


def test_rlp_policy_baseline_uses_the_policy_no_think_score():
    inp = make_input(logp_with_thought=[-1.0, -3.0, -2.0], logp_no_thought_ema=-9.0, logp_no_thought_policy=-2.0)
    reward = get_reward("rlp_info_gain_policy_baseline")
    assert reward.needs == {"logp_with_thought", "logp_no_thought_policy"}
    assert reward(inp) == pytest.approx([1.0, -1.0, 0.0])


def test_rlp_without_its_scores_is_dropped_not_raised():
    rewards, dropped = score_group(get_reward("rlp_info_gain"), make_input(logp_with_thought=[0.0, 0.0, 0.0]))
    assert rewards == [None, None, None] and dropped == 3


# group advantages


def test_group_advantages_match_formula_and_leave_one_out():
    r = [1.0, -0.5, 2.0, 0.25]
    g, mean = len(r), sum(r) / len(r)
    a = group_advantages(r)
    assert sum(a) == pytest.approx(0.0, abs=1e-12)
    assert a == pytest.approx([g / (g - 1) * (x - mean) for x in r])
    loo = [x - (sum(r) - x) / (g - 1) for x in r]
    assert a == pytest.approx(loo)


def test_group_advantages_renormalise_over_kept_thoughts():
    a = group_advantages([1.0, None, 3.0, None, 5.0])
    # G' = 3, mean 3: A = 3/2 · (r − 3)
    assert a[1] is None and a[3] is None
    assert [a[0], a[2], a[4]] == pytest.approx([-3.0, 0.0, 3.0])


@pytest.mark.parametrize("rewards", [[None, 2.0, None], [None, None], [1.0], []])
def test_group_advantages_need_two_kept(rewards):
    assert group_advantages(rewards) == [None] * len(rewards)


# score_group


def test_score_group_drops_a_raising_reward(caplog):
    def broken(inp):
        raise RuntimeError("boom")

    reward = Reward(name="broken_for_test", fn=broken)
    with caplog.at_level("WARNING", logger="rewards.base"):
        for _ in range(3):
            assert score_group(reward, make_input()) == ([None, None, None], 3)
    logged = [rec for rec in caplog.records if "broken_for_test" in rec.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None  # once, with the traceback


def test_score_group_drops_bad_values():
    reward = Reward(name="bad_values", fn=lambda inp: [1.0, float("nan"), None, float("inf"), -float("inf"), 2])
    rewards, dropped = score_group(reward, make_input(thought_texts="abcdef"))
    assert rewards == [1.0, None, None, None, None, 2.0] and dropped == 4


@pytest.mark.parametrize("out", [[1.0, 2.0], [1.0, 2.0, 3.0, 4.0], 1.0, "123"])
def test_score_group_wrong_shape_drops_all(out):
    rewards, dropped = score_group(Reward(name=f"shape_{out!r}", fn=lambda inp: out), make_input())
    assert rewards == [None, None, None] and dropped == 3


# registry


def test_get_reward_by_name():
    reward = get_reward("rlp_info_gain")
    assert reward.needs == {"logp_with_thought", "logp_no_thought_ema"}
    assert get_reward("rpt_prefix_match").needs == frozenset()
    assert {"rlp_info_gain", "rlp_info_gain_policy_baseline", "rpt_prefix_match", "rpt_first_token"} <= set(
        registered_rewards()
    )


def test_unknown_reward_lists_registered_and_dotted_form():
    with pytest.raises(ValueError) as e:
        get_reward("rlp_info_gian")
    msg = str(e.value)
    assert str(registered_rewards()) in msg and "pkg.module:function" in msg


def test_dotted_path_loads_user_reward_with_its_needs(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(
        "def gain_x2(inp):\n"
        "    return [2 * (lp - inp.logp_no_thought_policy) for lp in inp.logp_with_thought]\n"
        "gain_x2.needs = ('logp_with_thought', 'logp_no_thought_policy')\n"
        "def plain(inp):\n"
        "    return [0.0] * inp.group_size\n"
        "bad_needs = lambda inp: []\n"
        "bad_needs.needs = ['logp_everything']\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = get_reward("my_rewards_mod:gain_x2")
    assert reward.needs == {"logp_with_thought", "logp_no_thought_policy"}
    inp = make_input(logp_with_thought=[-1.0, -2.0, -3.0], logp_no_thought_policy=-2.0)
    assert reward(inp) == pytest.approx([2.0, 0.0, -2.0])
    assert get_reward("my_rewards_mod:plain").needs == frozenset()
    with pytest.raises(ValueError, match="logp_everything"):
        get_reward("my_rewards_mod:bad_needs")
    with pytest.raises(ValueError, match="no attribute 'missing'"):
        get_reward("my_rewards_mod:missing")
    with pytest.raises(ValueError, match="cannot import module 'no_such_rewards_mod'"):
        get_reward("no_such_rewards_mod:fn")


def test_register_rejects_duplicates_and_unknown_needs():
    with pytest.raises(ValueError, match="already registered"):
        register("rlp_info_gain")(lambda inp: [])
    with pytest.raises(ValueError, match="logp_typo"):
        register("never_registered", needs=["logp_typo"])
    assert "never_registered" not in registered_rewards()


# RPT


@pytest.mark.parametrize(
    "text, expected",
    [
        ("no box here", None),
        ("think... \\boxed{ 42}", " 42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("first \\boxed{1} then \\boxed{{a}{b}} done", "{a}{b}"),
        ("\\boxed{a \\boxed{b}}", "a \\boxed{b}"),
        ("\\boxed{7} and a truncated \\boxed{8", "7"),
        ("\\boxed{}", ""),
    ],
)
def test_extract_prediction(text, expected):
    assert extract_prediction(text) == expected


@pytest.mark.parametrize(
    "prediction, expected",
    [(" 4", True), (" 42", True), (" 42!", False), (" ", False), ("4", False), ("", False), (" 43", False)],
)
def test_prefix_match_ends_on_a_token_boundary(prediction, expected):
    assert prefix_match(prediction, [" 4", "2"]) is expected


def test_prefix_match_is_byte_level_across_a_split_character():
    # "café!" with the two bytes of "é" (c3 a9) cut between tokens, as a byte-level BPE can.
    as_bytes = [b"caf\xc3", b"\xa9!"]
    as_text = [t.decode("utf-8", "surrogateescape") for t in as_bytes]
    for tokens in (as_bytes, as_text):
        assert prefix_match("café!", tokens)
        assert not prefix_match("café", tokens)  # ends inside the second token
        assert not prefix_match("caf", tokens)  # ends inside the first token's bytes
    assert prefix_match("日", ["\udce6\udc97", "\udca5"]) and not prefix_match("日", ["\udce6\udc97"])


def test_rpt_rewards_on_a_group():
    inp = make_input(
        thought_texts=["so \\boxed{ 4}", "\\boxed{ 42}", "\\boxed{4}", "no answer", "\\boxed{ 4} no, \\boxed{ 5}"]
    )
    assert rpt_prefix_match(inp) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert rpt_first_token(inp) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert score_group(get_reward("rpt_prefix_match"), inp) == ([1.0, 1.0, 0.0, 0.0, 0.0], 0)


def test_rpt_trl_adapter_plain_and_conversational():
    targets = [[" 4", "2"], ["Hello"], [" x"]]
    texts = ["\\boxed{ 42}", "\\boxed{Hell}", "nothing"]
    extra = dict(completion_ids=[[1], [2], [3]], trainer_state=None, log_extra=None, log_metric=None, answer=[1, 2, 3])
    plain = rpt_prefix_match_trl(prompts=["p"] * 3, completions=texts, target_token_texts=targets, **extra)
    assert plain == [1.0, 0.0, 0.0]
    conversational = [
        [{"role": "assistant", "content": "\\boxed{ 4}"}],
        [{"role": "assistant", "content": "\\boxed{nope}"}, {"role": "assistant", "content": "\\boxed{Hello}"}],
        [{"role": "assistant", "content": [{"type": "text", "text": "\\boxed{ x}"}]}],
    ]
    prompts = [[{"role": "user", "content": "p"}]] * 3
    conv = rpt_prefix_match_trl(prompts=prompts, completions=conversational, target_token_texts=targets, **extra)
    assert conv == [1.0, 1.0, 1.0]


def test_reward_input_checks_shapes():
    assert make_input().group_size == 3
    with pytest.raises(ValueError, match="logp_with_thought"):
        make_input(logp_with_thought=[0.0])
    with pytest.raises(ValueError, match="target_ids"):
        make_input(targets=())
