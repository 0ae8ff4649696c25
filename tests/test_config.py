"""Config composition and the errors a user sees for a wrong key or value."""

import pytest

from training.config import CONFIG_DIR, ConfigError, PretrainConfig, load_config

YAML = CONFIG_DIR / "ttt_pretrain.yaml"


def test_defaults_compose_groups_and_overrides():
    cfg = load_config(PretrainConfig, YAML, ["model=125m", "optim.lr=1e-3", "train.steps=70", "model.mode=swa"])
    assert cfg.model.name == "125m" and cfg.model.hidden_size == 768 and cfg.model.mode == "swa"
    assert cfg.optim.lr == 1e-3 and cfg.train.steps == 70
    default = load_config(PretrainConfig, YAML, [])
    assert default.model.name == "tiny" and default.data.source == "embedded"


def test_unknown_key_names_key_and_nearest():
    with pytest.raises(ConfigError, match=r"optim\.lrr.*did you mean optim\.lr"):
        load_config(PretrainConfig, YAML, ["optim.lrr=1e-3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*did you mean train"):
        load_config(PretrainConfig, YAML, ["trian.steps=3"])


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("optim.lr=-1e-3", r"optim\.lr=-0\.001 must be > 0"),
        ("model.sliding_window=0", r"model\.sliding_window=0 must be > 0"),
        ("model.mode=mamba", r"model\.mode='mamba' must be one of \['full', 'swa', 'ttt_e2e'\]"),
        ("data.heldout_fraction=1.5", r"data\.heldout_fraction=1\.5 must be in \[0, 1\)"),
        ("model.num_attention_heads=5", r"divisible by model\.num_attention_heads=5"),
        ("optim.warmup_steps=10000", r"optim\.warmup_steps=10000 must be <= train\.steps"),
        ("model.num_key_value_heads=3", r"model\.num_key_value_heads=3 must divide model\.num_attention_heads=4"),
    ],
)
def test_bad_values_name_key_and_rule(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(PretrainConfig, YAML, [override])


def test_wrong_type_and_unknown_group_choice():
    with pytest.raises(ConfigError, match=r"train\.steps"):
        load_config(PretrainConfig, YAML, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"model=huge: no such config; choose one of \[.*'125m'.*'tiny'"):
        load_config(PretrainConfig, YAML, ["model=huge"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(PretrainConfig, YAML, ["optim.lr"])


def test_required_value_missing():
    with pytest.raises(ConfigError, match=r"data\.source"):
        load_config(PretrainConfig, YAML, ["data=files"])


def test_pipeline_exits_with_message(capsys):
    import pipelines.ttt_pretrain as p

    with pytest.raises(SystemExit) as exit_info:
        p.main(["optim.lrr=1"])
    assert exit_info.value.code == 2
    assert "optim.lrr" in capsys.readouterr().err


def test_vllm_engine_refuses_a_base_it_cannot_serve(tmp_path):
    from models import PonderConfig, PonderForCausalLM
    from training.config import RLPMidtrainConfig
    from training.run import check_vllm_serves

    # Without a base the pipeline pretrains a Ponder model, which vLLM may serve: checked at start.
    cfg = load_config(RLPMidtrainConfig, CONFIG_DIR / "rlp_midtrain.yaml", ["rollout.engine=vllm"])
    PonderForCausalLM(PonderConfig(vocab_size=64, hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                                   intermediate_size=64, mode="ttt_e2e", mini_batch_size=8,
                                   cms_chunk_sizes=[8, 16])).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"cannot serve .*continuum memory.*rollout\.engine=torch"):
        check_vllm_serves(tmp_path, cfg.model, None, cfg.ttt)


@pytest.mark.parametrize("schema,yaml", [("RLPMidtrainConfig", "rlp_midtrain.yaml"), ("RPTTrainConfig", "rpt_train.yaml")])
def test_rlp_and_rpt_refuse_pretrainings_thought_length_key(schema, yaml):
    """One key for the thought length: rlp.thought_max_tokens; train.task_think_tokens would be ignored."""
    import training.config as config

    with pytest.raises(ConfigError, match=r"train\.task_think_tokens=40 .*rlp\.thought_max_tokens"):
        load_config(getattr(config, schema), CONFIG_DIR / yaml, ["train.task_think_tokens=40", "base=x"])
    assert load_config(config.RLPMidtrainConfig, CONFIG_DIR / "rlp_midtrain.yaml",
                       ["rlp.thought_max_tokens=40"]).rlp.thought_max_tokens == 40


def test_the_format_warm_up_needs_a_given_base_and_is_rlps_alone():
    """warmup.steps warms up a given base for RLP: without base= (the base pretraining teaches the
    format) and in RPT (whose responses have another format) it would be ignored, so it is refused."""
    import training.config as config

    with pytest.raises(ConfigError, match=r"warmup\.steps=5 warms up a given base="):
        load_config(config.RLPMidtrainConfig, CONFIG_DIR / "rlp_midtrain.yaml", ["warmup.steps=5"])
    with pytest.raises(ConfigError, match=r"warmup\.steps=5 is rlp_midtrain's"):
        load_config(config.RPTTrainConfig, CONFIG_DIR / "rpt_train.yaml", ["warmup.steps=5", "base=x"])
    with pytest.raises(ConfigError, match=r"warmup\.target_closed_frac"):
        load_config(config.RLPMidtrainConfig, CONFIG_DIR / "rlp_midtrain.yaml", ["warmup.target_closed_frac=0", "base=x"])
    cfg = load_config(config.RLPMidtrainConfig, CONFIG_DIR / "rlp_midtrain.yaml", ["warmup.steps=5", "base=x"])
    assert cfg.warmup.steps == 5
