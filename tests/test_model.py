"Invariants of microlm.model: HF parity, KV cache == no cache, checkpoints and their errors, loss and gradients."
import json, math
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F

from microlm.config import SMOKE, atomic_write
from microlm.model import (CONFIG, WEIGHTS, MicroLM, cached_attention, count_params, from_hf_config, hf_classes, hf_model,
                           load_model, lm_loss, positions_and_mask, rope_inv_freq, save_model, softcap, to_hf_config)

transformers = pytest.importorskip("transformers")

transformers.utils.logging.set_verbosity_error()
BASE_CFG = replace(SMOKE.model, vocab_size=512)
CONFIGS = {
    "tied-gqa": BASE_CFG,
    "untied-mha": replace(BASE_CFG, tie_word_embeddings=False, num_key_value_heads=2),
    "tied-gqa4-theta": replace(BASE_CFG, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0),
    "untied-gqa4-3layers": replace(BASE_CFG, hidden_size=128, num_attention_heads=4, num_key_value_heads=1,
                                   num_hidden_layers=3, tie_word_embeddings=False, rms_norm_eps=1e-6),
    "qk-norm": replace(BASE_CFG, qk_norm=True),  # Qwen3's twin
    "qk-norm-relu2-untied": replace(BASE_CFG, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                    qk_norm=True, hidden_act="relu2", tie_word_embeddings=False),
    "relu2": replace(BASE_CFG, hidden_act="relu2"),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: threads only add contention


def make(cfg, seed=0):
    "A model whose norm gains are not all ones, so that a norm applied in the wrong place cannot hide."
    torch.manual_seed(seed)
    m = MicroLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return m


def hf_twin(model, **over):
    conf, cls = hf_classes(model.cfg)
    hf = cls(conf(**{**to_hf_config(model.cfg), **over})).eval()
    hf.load_state_dict(model.state_dict(), strict=True)  # same names, no renaming
    return hf


def left_padded(cfg, lens, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, cfg.vocab_size, (len(lens), T), generator=g)
    am = torch.zeros(len(lens), T, dtype=torch.long)
    for i, n in enumerate(lens): am[i, T - n:] = 1
    return ids.masked_fill(am == 0, 3), am


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_keys_and_shapes_match_hf(name):
    ours = make(CONFIGS[name])
    hf = hf_model(ours.cfg)
    assert type(hf).__name__ == ("Qwen3ForCausalLM" if ours.cfg.qk_norm else "LlamaForCausalLM")
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}
    assert count_params(ours) == sum(p.numel() for p in hf.parameters())
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == ours.cfg.tie_word_embeddings


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_hf(name):
    ours = make(CONFIGS[name]); hf = hf_twin(ours)
    ids, am = left_padded(ours.cfg, [16, 11, 3], 16)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        plain = (ours(ids).logits - hf(ids).logits).abs().max().item()
        d = (ours(ids, attention_mask=am).logits - hf(ids, attention_mask=am, position_ids=pos).logits).abs()
    padded = d[am.bool()].max().item()
    print(f"{name}: max|dlogits| plain={plain:.2e} left-padded={padded:.2e}")
    assert plain < 1e-5 and padded < 1e-5
    # the comparison is sensitive: a different RoPE base is caught
    with torch.no_grad():
        off = (ours(ids).logits - hf_twin(ours, rope_theta=ours.cfg.rope_theta * 2)(ids).logits).abs().max().item()
    assert off > 1e-4  # ten times the tolerance: the 1e-5 check can fail


def test_loss_matches_hf_with_ignored_labels():
    ours = make(CONFIGS["untied-mha"]); hf = hf_twin(ours)
    ids = torch.randint(0, ours.cfg.vocab_size, (3, 12))
    labels = ids.clone(); labels[:, :5] = -100; labels[1, 8:] = -100
    with torch.no_grad(): a, b = ours(ids, labels=labels).loss, hf(ids, labels=labels).loss
    assert abs(a.item() - b.item()) < 1e-5


def test_labels_minus_100_ignored():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, -100, 4, -100], [-100, 6, 0, -100, 3]])
    # position t predicts labels[t+1]; supervised (row, t, target): (0,0,2),(0,2,4),(1,0,6),(1,1,0),(1,3,3)
    rows, ts, tg = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 2, 0, 1, 3]), torch.tensor([2, 4, 6, 0, 3])
    assert torch.allclose(lm_loss(logits, labels), F.cross_entropy(logits[rows, ts], tg), atol=1e-6)
    # logits where the next label is ignored do not matter
    noisy = logits.clone(); noisy[0, 1] += 100; noisy[1, 2] -= 50; noisy[:, -1] += 9
    assert torch.allclose(lm_loss(noisy, labels), lm_loss(logits, labels))
    assert lm_loss(logits, torch.full_like(labels, -100)).item() == 0.0  # nothing supervised: 0, not NaN


@pytest.mark.parametrize("tied", [True, False])
def test_gradient_reaches_every_parameter(tied):
    m = MicroLM(replace(BASE_CFG, tie_word_embeddings=tied)).train()
    ids = torch.randint(0, m.cfg.vocab_size, (2, 10))
    m(ids, labels=ids).loss.backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_initial_loss_and_residual_init():
    m = make(BASE_CFG)
    ids = torch.randint(0, BASE_CFG.vocab_size, (4, 64))
    with torch.no_grad(): loss = m(ids, labels=ids).loss.item()
    assert abs(loss - math.log(BASE_CFG.vocab_size)) < 0.15
    o, q = m.model.layers[0].self_attn.o_proj.weight.std(), m.model.layers[0].self_attn.q_proj.weight.std()
    assert abs(o / q - 1 / math.sqrt(2 * BASE_CFG.num_hidden_layers)) < 0.1


def test_zero_init_out_starts_every_block_as_the_identity():
    m = make(replace(BASE_CFG, zero_init_out=True))
    outs = [n for n, p in m.named_parameters() if n.endswith(("o_proj.weight", "down_proj.weight"))]
    assert len(outs) == 2 * BASE_CFG.num_hidden_layers
    assert all(m.get_parameter(n).abs().sum() == 0 for n in outs)
    assert m.model.layers[0].self_attn.q_proj.weight.std() > 0.01  # the rest as before
    ids = torch.randint(0, BASE_CFG.vocab_size, (2, 12))
    with torch.no_grad():
        skip = m.lm_head(m.model.norm(m.model.embed_tokens(ids)))  # no block changes the stream
        assert torch.allclose(m(ids).logits, skip, atol=1e-6)
    m.train()
    m(ids, labels=ids).loss.backward()
    assert all(m.get_parameter(n).grad.abs().sum() > 0 for n in outs)  # the first step gives them their scale


def greedy_cached(model, ids, am, n):
    cache = model.new_cache(ids.shape[0], ids.shape[1] + n)
    logits = [model(ids, attention_mask=am, cache=cache, logits_to_keep=1).logits[:, -1]]
    toks = [logits[-1].argmax(-1)]
    for _ in range(n - 1):
        logits.append(model(toks[-1][:, None], cache=cache).logits[:, -1]); toks.append(logits[-1].argmax(-1))
    return torch.stack(toks, 1), torch.stack(logits, 1)


def greedy_full(model, ids, am, n):
    toks, logits = [], []
    for _ in range(n):
        lg = model(ids, attention_mask=am).logits[:, -1]
        logits.append(lg); toks.append(lg.argmax(-1))
        ids = torch.cat([ids, toks[-1][:, None]], 1); am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
    return torch.stack(toks, 1), torch.stack(logits, 1)


@pytest.mark.parametrize("name", ["tied-gqa", "untied-gqa4-3layers", "qk-norm-relu2-untied"])
def test_cache_equals_no_cache_batched_left_padded(name):
    m = make(CONFIGS[name])
    ids, am = left_padded(m.cfg, [9, 4, 1], 9)
    with torch.no_grad():
        t1, l1 = greedy_cached(m, ids, am, 12)
        t2, l2 = greedy_full(m, ids, am, 12)
    d = (l1 - l2).abs().max().item()
    print(f"{name}: cached vs full decode max|dlogits|={d:.2e}")
    assert torch.equal(t1, t2) and d < 1e-5
    # each row equals the same prompt run alone, unpadded
    with torch.no_grad(): alone, _ = greedy_full(m, ids[1:2, -4:], am[1:2, -4:], 12)
    assert torch.equal(alone, t1[1:2])


def test_cache_prefill_decode_equals_full_forward_and_hf_generate():
    m = make(CONFIGS["tied-gqa4-theta"]); hf = hf_twin(m)
    ids, am = left_padded(m.cfg, [7, 3], 7)
    with torch.no_grad():
        toks, _ = greedy_cached(m, ids, am, 10)
        ref = hf.generate(ids, attention_mask=am, max_new_tokens=10, do_sample=False, pad_token_id=3, eos_token_id=None)
    assert torch.equal(ref[:, 7:], toks)
    # no padding: prefill 5, decode chunks of 1 and 3 (a cache offset with T > 1), vs one forward
    x = torch.randint(0, m.cfg.vocab_size, (2, 12))
    with torch.no_grad():
        cache = m.new_cache(2, 12)
        parts = [m(x[:, :5], cache=cache).logits, m(x[:, 5:6], cache=cache).logits, m(x[:, 6:9], cache=cache).logits,
                 m(x[:, 9:], cache=cache).logits]
        d = (torch.cat(parts, 1) - m(x).logits).abs().max().item()
    assert cache.length == 12 and d < 1e-5


def test_cache_mask_forms_agree_and_errors():
    m = make(BASE_CFG)
    ids, am = left_padded(m.cfg, [6, 2], 6)
    nxt = torch.randint(0, m.cfg.vocab_size, (2, 2))
    outs = []
    with torch.no_grad():
        for form in ("none", "new", "full"):
            c = m.new_cache(2, 10); m(ids, attention_mask=am, cache=c)
            mask = {"none": None, "new": torch.ones(2, 2, dtype=torch.long),
                    "full": torch.cat([am, torch.ones(2, 2, dtype=torch.long)], 1)}[form]
            outs.append(m(nxt, attention_mask=mask, cache=c).logits)
        assert torch.allclose(outs[0], outs[1]) and torch.allclose(outs[0], outs[2])
        c = m.new_cache(2, 7); m(ids, cache=c)
        with pytest.raises(ValueError, match="cache full"): m(nxt, cache=c)
        with pytest.raises(ValueError, match="batch size"): m(ids[:1], cache=m.new_cache(2, 8))
        with pytest.raises(ValueError, match="max_position_embeddings"): m(torch.zeros(1, m.cfg.max_position_embeddings + 1, dtype=torch.long))
    c.reset(); assert c.length == 0 and c.mask is None


def test_logits_to_keep():
    m = make(BASE_CFG); ids = torch.randint(0, BASE_CFG.vocab_size, (2, 8))
    with torch.no_grad():
        full = m(ids).logits
        assert torch.allclose(m(ids, logits_to_keep=3).logits, full[:, -3:], atol=1e-6)
        assert torch.allclose(m(ids, logits_to_keep=1).logits, full[:, -1:], atol=1e-6)
    with pytest.raises(ValueError, match="labels"): m(ids, labels=ids, logits_to_keep=1)


def test_positions_and_mask():
    pos, mask = positions_and_mask(torch.tensor([[0, 1, 1], [1, 1, 1]]), T=1, past=2)
    assert pos.tolist() == [[1], [2]] and mask.shape == (2, 1, 1, 3)
    assert mask[0, 0, 0].tolist() == [False, True, True]
    assert positions_and_mask(None, T=5)[1] is None  # plain causal: SDPA's is_causal fast path


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_round_trip(tmp_path, tied):
    from safetensors import safe_open
    m = make(replace(BASE_CFG, tie_word_embeddings=tied))
    (tmp_path/"optimizer.pt").write_bytes(b"keep me")
    save_model(m, tmp_path)
    back = load_model(tmp_path).eval()
    ids = torch.randint(0, BASE_CFG.vocab_size, (2, 8))
    with torch.no_grad(): assert torch.equal(back(ids).logits, m(ids).logits)
    assert back.cfg == m.cfg and (back.lm_head.weight is back.model.embed_tokens.weight) == tied
    with safe_open(str(tmp_path/WEIGHTS), "pt") as f: keys = set(f.keys())
    assert ("lm_head.weight" in keys) == (not tied)
    assert json.loads((tmp_path/CONFIG).read_text())["format"] == "microlm"
    assert (tmp_path/"optimizer.pt").read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG, WEIGHTS, "optimizer.pt"])  # no temp litter


def _rewrite_weights(folder, fn):
    from safetensors.torch import load_file, save_file
    sd = load_file(str(folder/WEIGHTS)); fn(sd); save_file(sd, str(folder/WEIGHTS))


def test_bad_checkpoints(tmp_path):
    m = make(BASE_CFG); d = tmp_path/"ck"
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"): load_model(d)
    d.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json: missing"): load_model(d)
    save_model(m, d); (d/WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors: missing"): load_model(d)
    save_model(m, d); (d/WEIGHTS).write_bytes((d/CONFIG).read_bytes())  # corrupt
    with pytest.raises(ValueError, match="not a readable safetensors"): load_model(d)
    save_model(m, d); (d/WEIGHTS).write_bytes(b"")  # empty file
    with pytest.raises(ValueError, match="not a readable safetensors"): load_model(d)
    save_model(m, d); _rewrite_weights(d, lambda sd: [sd.pop("model.norm.weight"), sd.pop("model.layers.1.mlp.up_proj.weight")])
    with pytest.raises(ValueError, match=r"2 missing: \['model.layers.1.mlp.up_proj.weight', 'model.norm.weight'\]"): load_model(d)
    save_model(m, d); _rewrite_weights(d, lambda sd: sd.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(ValueError, match="unexpected"): load_model(d)
    save_model(m, d); _rewrite_weights(d, lambda sd: sd.update({"lm_head.weight": torch.zeros(512, 64)}))
    with pytest.raises(ValueError, match="lm_head.weight differs"): load_model(d)
    save_model(MicroLM(replace(BASE_CFG, intermediate_size=96)), d)
    atomic_write(d/CONFIG, {**asdict(BASE_CFG), "format": "microlm"})
    with pytest.raises(ValueError, match=r"mlp.gate_proj.weight: expected \(192, 64\), found \(96, 64\)"): load_model(d)
    save_model(m, d); atomic_write(d/CONFIG, {**asdict(BASE_CFG), "format": "microlm", "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="must divide"): load_model(d)
    atomic_write(d/CONFIG, {**asdict(BASE_CFG), "format": "microlm", "hiden_size": 3})
    with pytest.raises(ValueError, match="unknown field.*hiden_size"): load_model(d)
    atomic_write(d/CONFIG, {**to_hf_config(BASE_CFG), "model_type": "llama"})
    with pytest.raises(ValueError, match="not a microlm checkpoint"): load_model(d)
    (d/CONFIG).write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"): load_model(d)


def test_bf16_model_still_runs_rope_in_fp32():
    m = make(BASE_CFG)
    ids = torch.randint(0, BASE_CFG.vocab_size, (1, 8))
    with torch.no_grad(): ref = m(ids).logits
    m = m.to(torch.bfloat16)
    assert m.inv_freq.dtype == torch.bfloat16
    f = m._inv_freq()  # what RoPE rotates with: the fp32 frequencies, not the bf16-rounded buffer
    assert f.dtype == torch.float32 and torch.equal(f, rope_inv_freq(BASE_CFG.head_dim, BASE_CFG.rope_theta))
    with torch.no_grad(): lo = m(ids).logits.float()
    c = m.new_cache(1, 8); assert c.k[0].dtype == torch.bfloat16
    assert (lo - ref).abs().max() < 0.1


def test_qk_norm_normalises_each_head_and_is_sensitive():
    "QK-norm: every head's query and key has unit RMS times the gain; the twin without it differs."
    m = make(CONFIGS["qk-norm"])
    a = m.model.layers[0].self_attn
    seen = {}
    a.q_norm.register_forward_hook(lambda mod, i, o: seen.update(q_in=i[0], q_out=o))
    ids = torch.randint(0, m.cfg.vocab_size, (2, 9))
    with torch.no_grad():
        with_norm = m(ids).logits
        q = seen["q_in"]  # (B, T, heads, head_dim): normalised per head, before RoPE
        want = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + m.cfg.rms_norm_eps) * a.q_norm.weight
        assert q.shape[-2:] == (m.cfg.num_attention_heads, m.cfg.head_dim)
        assert (seen["q_out"] - want).abs().max() < 1e-6
        plain = MicroLM(replace(m.cfg, qk_norm=False)).eval()
        plain.load_state_dict({k: v for k, v in m.state_dict().items() if "_norm." not in k or "layernorm" in k})
        assert (plain(ids).logits - with_norm).abs().max() > 1e-3


def test_softcap_bounds_logits_and_loss():
    cap = 2.0
    m = make(replace(BASE_CFG, logit_softcap=cap))
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4)  # large logits, so that the cap binds
        ids = torch.randint(0, m.cfg.vocab_size, (2, 12))
        out = m(ids, labels=ids)
    assert out.logits.abs().max() < cap
    uncapped = MicroLM(replace(m.cfg, logit_softcap=0.0)).eval()
    uncapped.load_state_dict(m.state_dict())
    with torch.no_grad():
        ref = uncapped(ids).logits
        assert ref.abs().max() > cap  # the cap did something
        assert torch.allclose(out.logits, cap * torch.tanh(ref / cap), atol=1e-6)
        assert torch.allclose(out.loss, lm_loss(softcap(ref, cap), ids), atol=1e-6)
        tgt = F.pad(ids[:, 1:], (0, 1), value=-100)
        assert torch.allclose(m(ids, targets=tgt).loss, out.loss, atol=1e-5)
    assert torch.equal(softcap(ref, 0.0), ref)


def test_architecture_options_errors():
    with pytest.raises(ValueError, match="hidden_act must be one of"):
        replace(BASE_CFG, hidden_act="gelu")
    with pytest.raises(ValueError, match="logit_softcap must be >= 0"):
        replace(BASE_CFG, logit_softcap=-1.0)
    with pytest.raises(ValueError, match="neither LlamaConfig nor Qwen3Config holds a logit soft-cap"):
        to_hf_config(replace(BASE_CFG, logit_softcap=30.0))


@pytest.mark.parametrize("T", [1, 3])
def test_cached_attention_is_sdpas_arithmetic(T):
    "A few queries on cached keys by plain products: sdpa's result in fp32; in bf16 within bf16's rounding of it."
    g = torch.Generator().manual_seed(T)
    q, k, v = torch.randn(3, 4, T, 16, generator=g), torch.randn(3, 2, 10, 16, generator=g), torch.randn(3, 2, 10, 16, generator=g)
    mask = torch.rand(3, 1, T, 10, generator=g) > 0.4
    mask[..., -1] = True                                                  # every query sees at least itself
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert (cached_attention(q, k, v, mask) - ref).abs().max() < 1e-5
    assert (cached_attention(q, k, v) - F.scaled_dot_product_attention(q, k, v, enable_gqa=True)).abs().max() < 1e-5
    lo = cached_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert lo.dtype == torch.bfloat16 and (lo.float() - ref).abs().max() < 0.05
    assert (lo.float() - ref).abs().max() > 0                             # it did run in bf16: not the fp32 result


def test_bf16_decoding_steps_follow_the_full_forward():
    "A bf16 model's cached steps (cached_attention) give the logits of the full forward, left padding included."
    m = make(BASE_CFG).to(torch.bfloat16)
    ids, am = left_padded(BASE_CFG, [12, 7, 10], 12)
    with torch.no_grad():
        full = m(ids, attention_mask=am).logits.float()
        cache = m.new_cache(3, 12)
        pre = m(ids[:, :8], attention_mask=am[:, :8], cache=cache).logits.float()
        steps = [m(ids[:, t:t + 1], attention_mask=am[:, t:t + 1], cache=cache).logits.float() for t in range(8, 12)]
    got = torch.cat([pre, *steps], 1)
    real = am.bool()
    assert (got - full)[real].abs().max() < 0.15 and (got.argmax(-1) == full.argmax(-1))[real].float().mean() > 0.9


def test_cache_select_keeps_rows_in_order():
    "KVCache.select: the kept rows go on decoding exactly as they would have in the whole batch."
    m = make(BASE_CFG)
    ids, am = left_padded(BASE_CFG, [9, 5, 7], 9)
    nxt = torch.randint(4, BASE_CFG.vocab_size, (3, 1))
    with torch.no_grad():
        whole = m.new_cache(3, 12)
        m(ids, attention_mask=am, cache=whole)
        ref = m(nxt, cache=whole).logits
        part = m.new_cache(3, 12)
        m(ids, attention_mask=am, cache=part)
        part.select(torch.tensor([2, 0]))
        assert part.batch_size == 2 and part.mask.shape[0] == 2 and part.k[0].shape[0] == 2
        got = m(nxt[[2, 0]], cache=part).logits
    assert torch.allclose(got, ref[[2, 0]], atol=1e-5)


@pytest.mark.parametrize("name", ["tied-gqa4-theta", "untied-gqa4-3layers", "qk-norm"])
def test_from_hf_config_inverts_to_hf_config(name):
    cfg = CONFIGS[name]
    conf, _ = hf_classes(cfg)
    assert from_hf_config(conf(**to_hf_config(cfg))) == replace(cfg, initializer_range=cfg.initializer_range)


def test_from_hf_config_refuses_what_microlm_is_not():
    from transformers import GPT2Config, LlamaConfig, Qwen3Config
    kw = to_hf_config(BASE_CFG)
    with pytest.raises(ValueError, match="model_type 'gpt2'"): from_hf_config(GPT2Config())
    with pytest.raises(ValueError, match="attention_bias=True"): from_hf_config(LlamaConfig(**{**kw, "attention_bias": True}))
    with pytest.raises(ValueError, match="rope_type 'linear'"):
        from_hf_config(LlamaConfig(**kw, rope_scaling={"rope_type": "linear", "factor": 2.0}))
    with pytest.raises(ValueError, match=f"head_dim {BASE_CFG.head_dim * 2} is not"): from_hf_config(LlamaConfig(**{**kw, "head_dim": BASE_CFG.head_dim * 2}), "x.json")
    with pytest.raises(ValueError, match="use_sliding_window"):
        from_hf_config(Qwen3Config(**{**kw, "use_sliding_window": True, "sliding_window": 8}))
