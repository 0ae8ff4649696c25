"""Hugging Face Llama / Qwen3 -> TTT-E2E (models/convert.py, pipelines/convert_hf.py) and the bridge
(ttt_pretrain base=<converted>). Source models are made here: tiny, random, saved with
save_pretrained beside a tokenizer trained locally."""

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, LlamaForCausalLM, MistralConfig, Qwen3Config, Qwen3ForCausalLM

import pipelines.convert_hf as convert_cli
import pipelines.ttt_pretrain as pretrain
from models import PonderForCausalLM
from models.convert import ConversionError, convert_hf
from training.preflight import tokenizer_beside
from training.tokenizer import train_tokenizer

WINDOW, CHUNK = 64, 16
TEXTS = [f"Tom has {a} apples and buys {b} more, so he has {a + b} apples." for a in range(40) for b in range(5)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=290)


def llama3_rope():
    # head dim 16: wavelengths 6.3 (kept), 32.5 (on the ramp), 168 and up (divided by the factor)
    return {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


SOURCES = {  # name: the model class, its config class, what sets it apart
    "llama_tied_gqa": (LlamaForCausalLM, LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama_untied_llama3_rope": (LlamaForCausalLM, LlamaConfig, dict(num_key_value_heads=1, tie_word_embeddings=False,
                                                                     rope_parameters=llama3_rope())),
    "qwen3_qk_norm": (Qwen3ForCausalLM, Qwen3Config, dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)),
}


def save_source(path, name, tokenizer, **overrides):
    cls, config_cls, special = SOURCES[name]
    # a large init (0.2) makes attention sharp and logits O(1), so a wrong mapping shows
    config = config_cls(**{**dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                  num_attention_heads=4, initializer_range=0.2, max_position_embeddings=256,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id), **special, **overrides})
    torch.manual_seed(0)
    model = cls(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


@pytest.mark.parametrize("name", list(SOURCES))
def test_converted_model_computes_the_source_function_with_the_inner_loop_running(tmp_path, tokenizer, name):
    source = save_source(tmp_path, name, tokenizer)
    model = convert_hf(tmp_path, suffix_len=2, sliding_window=WINDOW, mini_batch_size=CHUNK).eval()
    torch.manual_seed(1)
    ids = torch.randint(0, len(tokenizer), (2, 48))  # three chunks, all within the window
    targets = torch.cat([ids[:, 1:], ids[:, :1]], 1)
    with torch.no_grad():
        expected = source(input_ids=ids).logits
        state = model.new_state(2)
        got = model(ids, targets=targets).logits  # the inner loop learns from chunks 1 and 2
        decoded = torch.cat([model(ids[:, i:i + 8], state=state).logits for i in range(0, 48, 8)], 1)
    scale = expected.abs().max()
    assert scale > 1  # the function is far from flat
    for logits in (got, decoded):
        assert (logits - expected).abs().max() <= 1e-5 * scale  # HF's float32 RoPE angles dominate this
    # MLP′'s output gain is zero, so every inner gradient is exactly zero: the fast weights stay at W_0 ...
    for w0, w in zip([w for b in model.blocks[model.n_prefix:] for w in b.fast_mlp.f.weights()],
                     [w for layer in state.fast for w in layer]):
        assert torch.equal(w[0], w0) and torch.equal(w[1], w0)
    # ... and the meta-gradient reaches that gain: the bridge's first step opens it.
    model.train()
    model(ids, targets=targets).loss.backward()
    gain = model.blocks[-1].fast_mlp.post_norm.weight
    assert gain.grad.abs().sum() > 0 and model.blocks[-1].fast_mlp.f.w1.weight.grad.abs().sum() == 0


def test_attention_switches_to_the_window(tmp_path, tokenizer):
    source = save_source(tmp_path, "llama_tied_gqa", tokenizer)
    model = convert_hf(tmp_path, sliding_window=WINDOW, mini_batch_size=CHUNK).eval()
    assert model.config.suffix_len == 1 and model.config.mode == "ttt_e2e"  # a quarter by default
    ids = torch.randint(0, len(tokenizer), (1, 96))
    with torch.no_grad():
        diff = (model(ids).logits - source(input_ids=ids).logits).abs().amax(-1)[0]
    assert diff[:WINDOW].max() <= 1e-4 and diff[WINDOW:].min() > 1e-3


@pytest.mark.parametrize("config, arch", [(GPT2Config(n_layer=2, n_embd=32, n_head=2), "GPT2LMHeadModel"),
                                          (MistralConfig(num_hidden_layers=2, hidden_size=32), "MistralForCausalLM")])
def test_unsupported_architecture_fails_at_start_naming_it(tmp_path, capsys, config, arch):
    config.architectures = [arch]
    config.save_pretrained(tmp_path)  # a config alone: the check runs before any weight is read
    with pytest.raises(ConversionError, match=f"{arch} is not supported; supported: LlamaForCausalLM, Qwen3ForCausalLM"):
        convert_hf(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        convert_cli.main([f"source={tmp_path}", f"out={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and arch in err and "Qwen3ForCausalLM" in err


def test_unimplemented_rope_scaling_is_refused_by_name(tmp_path, tokenizer):
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    config = Qwen3Config(num_hidden_layers=2, hidden_size=32, rope_parameters=yarn, architectures=["Qwen3ForCausalLM"])
    config.save_pretrained(tmp_path)
    with pytest.raises(ConversionError, match="rope type 'yarn' \\(implemented: default, linear, llama3\\)"):
        convert_hf(tmp_path)


def test_pretraining_refuses_an_unconverted_base(tmp_path, tokenizer, capsys):
    save_source(tmp_path / "llama", "llama_tied_gqa", tokenizer)
    with pytest.raises(SystemExit):
        pretrain.main([f"base={tmp_path / 'llama'}", f"out_dir={tmp_path}", "wandb.mode=disabled"])
    assert "convert it first with pipelines/convert_hf.py" in capsys.readouterr().err


def test_bridge_lowers_heldout_loss_and_decoding_equals_forward(tmp_path, tokenizer):
    save_source(tmp_path / "llama", "llama_untied_llama3_rope", tokenizer, initializer_range=0.02)
    out = convert_cli.main([f"source={tmp_path / 'llama'}", f"out={tmp_path / 'converted'}", "model.suffix_len=1",
                            "model.sliding_window=32", "model.mini_batch_size=16"])
    assert (out / "tokenizer.json").is_file()
    summary = pretrain.main([
        f"base={out}", f"out_dir={tmp_path}", "run_name=bridge", f"data.cache_dir={tmp_path / 'cache'}",
        "data.num_docs=200", "data.seq_len=64", "train.steps=30", "train.batch_size=8", "train.eval_every=30",
        "train.eval_windows=16", "optim.warmup_steps=3", "wandb.mode=disabled",
    ])
    assert summary["eval/bpb"] < 0.9 * summary["bpb_start"], summary

    assert tokenizer_beside(tmp_path / "bridge" / "model") == tmp_path / "bridge" / "tokenizer"  # for RLP's base=
    bridged = PonderForCausalLM.from_pretrained(tmp_path / "bridge" / "model").eval()
    assert bridged.config.tie_word_embeddings is False and bridged.config.num_key_value_heads == 1
    assert bridged.blocks[-1].fast_mlp.post_norm.weight.abs().max() > 0  # the bridge opened MLP′
    ids = torch.tensor([tokenizer(" ".join(TEXTS[7::50]), add_special_tokens=False)["input_ids"][:56]])
    assert ids.shape[1] == 56  # four chunks: three inner updates while decoding
    with torch.no_grad():
        forward = bridged(ids).logits
        state = bridged.new_state(1)
        stepped = torch.cat([bridged(ids[:, i:i + 1], state=state).logits for i in range(ids.shape[1])], 1)
    assert (stepped - forward).abs().max() <= 1e-4 * forward.abs().max()
    w0 = bridged.blocks[-1].fast_mlp.f.w2.weight
    assert not torch.allclose(state.fast[0][1][0], w0)  # the inner loop learned from the chunks it read


def test_bridge_can_train_the_fast_mlps_alone_first(tmp_path, tokenizer):
    save_source(tmp_path / "qwen3", "qwen3_qk_norm", tokenizer)
    out = convert_cli.main([f"source={tmp_path / 'qwen3'}", f"out={tmp_path / 'converted'}", "model.sliding_window=32",
                            "model.mini_batch_size=16"])
    pretrain.main([f"base={out}", f"out_dir={tmp_path}", "run_name=frozen", f"data.cache_dir={tmp_path / 'cache'}",
                   "data.num_docs=100", "data.seq_len=32", "train.steps=2", "train.batch_size=2", "train.eval_windows=2",
                   "optim.warmup_steps=1", "ttt.freeze_slow_steps=2", "wandb.mode=disabled"])
    before = PonderForCausalLM.from_pretrained(out).state_dict()
    after = PonderForCausalLM.from_pretrained(tmp_path / "frozen" / "model").state_dict()
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved and all(".fast_mlp." in name for name in moved)
    assert "blocks.3.fast_mlp.post_norm.weight" in moved


def test_a_llama_shaped_ponder_model_exports_to_llama_and_converts_back(tmp_path, tokenizer):
    from models import PonderConfig
    from models.convert import to_llama

    torch.manual_seed(0)
    plain = PonderForCausalLM(PonderConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=4,
                                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                           post_norm=False, qk_norm=False, initializer_range=0.2)).eval()
    llama = to_llama(plain).eval()
    llama.save_pretrained(tmp_path)
    converted = convert_hf(tmp_path, sliding_window=WINDOW, mini_batch_size=CHUNK).eval()
    ids = torch.randint(0, len(tokenizer), (2, 40))
    with torch.no_grad():
        expected = plain(ids).logits
        for logits in (llama(input_ids=ids).logits, converted(ids).logits):
            assert (logits - expected).abs().max() <= 1e-5 * expected.abs().max()
    with pytest.raises(ConversionError, match="post_norm=false"):
        to_llama(PonderForCausalLM(PonderConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)))


def test_pretraining_builds_grouped_query_attention_and_an_untied_head(tokenizer):
    from training.config import ModelConfig
    from training.run import build_model

    model = build_model(ModelConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                    tie_word_embeddings=False, mode="ttt_e2e", mini_batch_size=8), tokenizer)
    assert model.blocks[0].attn.f.wk.weight.shape == (8, 32) and model.head.weight.shape == (len(tokenizer), 32)
    ids = torch.randint(0, len(tokenizer), (2, 24))
    model(ids, targets=ids).loss.backward()
    assert model.head.weight.grad.abs().sum() > 0 and model.embed.weight.grad.abs().sum() > 0
