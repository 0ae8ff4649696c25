"""Continuum memory: fast weights at several frequencies (models/memory.py). The meta-gradient
against finite differences, the update rule against a hand-written reference, causality, decoding
equivalence, the one-level case equal to TTT-E2E, and misconfigured levels."""

import pytest
import torch

from models import PonderConfig, PonderForCausalLM
from kernels.sgd import clip_by_global_norm
from models.ttt import per_sequence_loss
from tests.finite_differences import assert_meta_gradient_matches_finite_differences
from tests.test_ttt import V, decode_in_pieces, next_tokens, ttt_model

def cms_model(dtype=torch.float32, seed=0, **kw):
    """TTT-E2E's test model with two levels: chunks of 4 and spans of 8."""
    return ttt_model(dtype, seed, **{"cms_chunk_sizes": [4, 8], "cms_inner_lrs": [0.5, 0.8], **kw})


@pytest.mark.parametrize("masked", [False, True])
def test_two_level_meta_gradient_matches_finite_differences_float64(masked):
    model = cms_model(torch.float64)
    model.inner_lr = 0.5  # mid-warmup: every level's lr scaled by inner_lr / ttt_inner_lr
    torch.manual_seed(1)
    x = torch.randint(0, V, (2, 18))  # level 1 steps at 4, 8, 12, 16; level 2 at 8 and 16
    y = next_tokens(x)
    if masked:
        y[0, 1], y[1, 4:8], y[1, 13] = -100, -100, -100
    params = {
        "W_0 level 2 (w1, last block)": model.blocks[3].memory_mlps[0].f.w1.weight,
        "W_0 level 2 (w2, first suffix block)": model.blocks[2].memory_mlps[0].f.w2.weight,
        "W_0 level 1 (w3, last block)": model.blocks[3].fast_mlp.f.w3.weight,
        "level 2 pre-norm": model.blocks[2].memory_mlps[0].pre_norm.weight,
        "slow: prefix attention wq": model.blocks[0].attn.f.wq.weight,
        "slow: embedding": model.embed.weight,
    }
    assert_meta_gradient_matches_finite_differences(model, x, y, params)


def test_level_updates_match_a_hand_written_reference():
    """One suffix block (its attention reads only the prefix, so a chunk's logits are a function of
    the fast weights it is predicted with): level 1 steps on every chunk of 4, level 2 on the mean
    of its two chunks' gradients at positions 8 and 16, each clipped on its own."""
    model = cms_model(torch.float64, suffix_len=1, cms_chunk_sizes=[4, 8], cms_inner_lrs=[0.7, 2.0]).eval()
    torch.manual_seed(3)
    B, T, b = 2, 20, 4
    x = torch.randint(0, V, (B, T))
    y = next_tokens(x)
    y[0, 5] = -100
    with torch.no_grad():
        logits = model(x, targets=y).logits

    block, P = model.blocks[-1], model.n_prefix
    levels = [[w.detach().unsqueeze(0).expand(B, *w.shape).clone() for w in lvl.f.weights()]
              for lvl in block.fast_levels()]
    with torch.no_grad():
        h = model.run_blocks(model.blocks[:P], model.embed(x), 0, None)
    gathered = None
    for start in range(0, T, b):
        end = min(T, start + b)
        w = [t.requires_grad_() for lvl in levels for t in lvl]
        out = model.lm_head(model.run_blocks(model.blocks[P:], h[:, :end], 0, None, P, [w]))[:, start:end]
        torch.testing.assert_close(logits[:, start:end], out.detach(), rtol=1e-10, atol=1e-10)
        if end - start < b:
            break
        g = torch.autograd.grad(per_sequence_loss(out, y[:, start:end]).sum(), w)
        g1, g2 = list(g[:3]), list(g[3:])
        levels[0] = [a.detach() - 0.7 * d for a, d in zip(levels[0], clip_by_global_norm(g1, 1.0))]
        gathered = g2 if gathered is None else [s + d for s, d in zip(gathered, g2)]
        if end % 8 == 0:
            levels[1] = [a.detach() - 2.0 * d for a, d in zip(levels[1], clip_by_global_norm([s / 2 for s in gathered], 1.0))]
            gathered = None
        else:
            levels[1] = [a.detach() for a in levels[1]]


def test_one_level_is_ttt_e2e_exactly():
    x = torch.randint(0, V, (2, 18))
    y = next_tokens(x)
    out, grads = {}, {}
    for levels in ([], [4]):
        model = cms_model(torch.float64, cms_chunk_sizes=levels, cms_inner_lrs=None)
        o = model(x, targets=y)
        o.loss.backward()
        out[len(levels)], grads[len(levels)] = o.logits, torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.equal(out[0], out[1]) and torch.equal(grads[0], grads[1])


def test_slow_level_waits_for_its_span_then_learns():
    model = cms_model().eval()
    x = torch.randint(0, V, (1, 17))
    w0 = [w.detach() for lvl in model.blocks[-1].fast_levels() for w in lvl.f.weights()]
    with torch.no_grad():
        state = model.new_state(1)
        model(x[:, :5], state=state)  # chunk [0, 4) and its last target: level 1 stepped
        after_4 = [w[0].clone() for w in state.fast[-1]]
        model(x[:, 5:9], state=state)  # chunk [4, 8): level 2's span ends
        after_8 = [w[0].clone() for w in state.fast[-1]]
    assert not torch.equal(after_4[0], w0[0])  # level 1 moved at 4
    assert all(torch.equal(a, w) for a, w in zip(after_4[3:], w0[3:]))  # level 2 not yet
    assert not torch.equal(after_8[3], w0[3])  # level 2 moved at 8


def test_token_causality_through_every_level():
    model = cms_model(cms_chunk_sizes=[4, 8, 16], cms_inner_lrs=None).eval()
    x = torch.randint(0, V, (2, 38))
    with torch.no_grad():
        base = model(x).logits
        for j in (3, 8, 15, 17, 33):
            z = x.clone()
            z[:, j] = (z[:, j] + 1) % V
            changed = model(z).logits
            torch.testing.assert_close(changed[:, :j], base[:, :j], rtol=0, atol=0)
            assert not torch.allclose(changed[:, j:], base[:, j:])


@pytest.mark.parametrize("pieces", [[1] * 27, [5, 1, 1, 7, 9, 4], [8, 8, 11], [3, 16, 8]])
def test_decoding_matches_the_training_forward(pieces):
    model = cms_model(cms_chunk_sizes=[4, 8, 16], cms_inner_lrs=[0.5, 0.8, 1.0]).eval()
    x = torch.randint(0, V, (2, 27))
    with torch.no_grad():
        full = model(x).logits
        parts, state = decode_in_pieces(model, x, pieces, copy_at=10)  # a copied state reads on like the original
    stepped = torch.cat(parts, 1)
    assert ((stepped - full).norm() / full.norm()) < 1e-5
    assert all(k.shape[2] <= 8 + 4 for k, _ in state.kv)  # the cache stays O(window)


def test_levels_keep_the_parameter_count():
    d, L, S = 64, 8, 2
    plain = PonderConfig(vocab_size=512, hidden_size=d, num_hidden_layers=L, num_attention_heads=4,
                         intermediate_size=256, suffix_len=S)
    with torch.device("meta"):
        n_plain = PonderForCausalLM(plain).num_params()
        for levels in ([32], [32, 128], [32, 128, 512]):
            cms = PonderForCausalLM(PonderConfig(**{**plain.to_dict(), "mode": "ttt_e2e", "mini_batch_size": 32,
                                                    "cms_chunk_sizes": levels}))
            assert len(cms.blocks[-1].fast_levels()) == len(levels)
            # every MLP rounds its width up to a multiple of 32: at most 32 columns of 3·d weights each
            slack = (L + S * len(levels)) * 3 * d * 32
            assert 0 <= cms.num_params() - n_plain <= slack, (levels, cms.num_params(), n_plain)


@pytest.mark.parametrize("kw, key", [
    (dict(cms_chunk_sizes=[4, 6]), "cms_chunk_sizes"),  # not a multiple of mini_batch_size
    (dict(cms_chunk_sizes=[8, 4]), "cms_chunk_sizes"),  # not increasing
    (dict(cms_chunk_sizes=[8, 8]), "cms_chunk_sizes"),
    (dict(cms_chunk_sizes=[4, 8], cms_inner_lrs=[1.0]), "cms_inner_lrs"),
    (dict(cms_chunk_sizes=[4, 8], cms_widths=[32, 32, 32]), "cms_widths"),
])
def test_misconfigured_levels_fail_naming_the_key(kw, key):
    from training.config import CONFIG_DIR, ConfigError, PretrainConfig, load_config

    with pytest.raises(ValueError, match=key):
        PonderConfig(mode="ttt_e2e", mini_batch_size=4, **kw)
    overrides = ["model.mode=ttt_e2e", "model.mini_batch_size=4"]
    overrides += [f"model.{k}=[{','.join(map(str, v))}]" for k, v in kw.items()]
    with pytest.raises(ConfigError, match=f"model.{key}") as e:
        load_config(PretrainConfig, CONFIG_DIR / "ttt_pretrain.yaml", overrides)
    assert "\n" not in str(e.value)
