"Invariants of microlm.fastpath: the written-out norm, RoPE and loss equal the plain model's numbers."
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from microlm.config import SMOKE
from microlm.fastpath import (FastMicroLM, FastRMSNorm, _RMSNormFunction, _RoPEFunction, _rms_parts, fast_rope,
                              linear_cross_entropy)
from microlm.model import MicroLM, RMSNorm, apply_rope, rms_norm, rope_cos_sin, rope_inv_freq, rotate_half

CFG = replace(SMOKE.model, vocab_size=512, hidden_size=128, num_attention_heads=4, num_key_value_heads=1,
              num_hidden_layers=3, tie_word_embeddings=False, rms_norm_eps=1e-6)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: threads only add contention


def twins(cfg=CFG, seed=0):
    "A plain and a fast model with the same weights."
    torch.manual_seed(seed)
    plain = MicroLM(cfg)
    fast = FastMicroLM(cfg)
    fast.load_state_dict(plain.state_dict())
    return plain, fast


def assert_same_loss_and_gradients(plain, fast, ids, tgt):
    "fp64 twins: the loss equal to 1e-12, every gradient equal to rounding."
    grads = []
    for m in (plain, fast):
        loss = m(ids, targets=tgt).loss
        grads.append((loss.item(), torch.autograd.grad(loss, list(m.parameters()))))
    (lp, gp), (lf, gf) = grads
    assert abs(lp - lf) < 1e-12
    for a, b in zip(gf, gp):
        assert (a - b).abs().max() <= 1e-10 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("chunk", [0, 1, 33, 1000])
def test_linear_cross_entropy_equals_cross_entropy_fp64(chunk):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(97, 24, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.randn(61, 24, dtype=torch.float64, generator=g).requires_grad_()
    t = torch.randint(0, 61, (97,), generator=g)
    t[::5] = -100
    ref = F.cross_entropy(x @ w.t(), t, ignore_index=-100)
    rx, rw = torch.autograd.grad(ref * 2.5, (x, w))
    got = linear_cross_entropy(x, w, t, chunk=chunk)
    gx, gw = torch.autograd.grad(got * 2.5, (x, w))
    assert abs(got.item() - ref.item()) < 1e-12
    assert (gx - rx).abs().max() < 1e-12 and (gw - rw).abs().max() < 1e-12
    with torch.no_grad():
        assert abs(linear_cross_entropy(x, w, t, chunk=chunk).item() - ref.item()) < 1e-12


def test_linear_cross_entropy_frozen_weight_and_nothing_supervised():
    x = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(20, 8)  # frozen, as under LoRA
    t = torch.randint(0, 20, (10,))
    (gx,) = torch.autograd.grad(linear_cross_entropy(x, w, t), x)
    (rx,) = torch.autograd.grad(F.cross_entropy(x @ w.t(), t), x)
    assert (gx - rx).abs().max() < 1e-6
    none = linear_cross_entropy(x, w, torch.full_like(t, -100))
    assert none.item() == 0.0 and torch.autograd.grad(none, x)[0].abs().max() == 0


def test_fast_model_equals_plain_model_fp64():
    "Same weights in fp64: identical inference logits, equal loss, gradients equal to rounding, with padding too."
    plain, fast = (m.double().train() for m in twins())
    with torch.no_grad():
        for n in list(plain.modules()) + list(fast.modules()):
            if isinstance(n, RMSNorm):
                n.weight.copy_(torch.linspace(0.5, 1.5, n.weight.numel(), dtype=torch.float64))
    ids = torch.randint(0, CFG.vocab_size, (2, 16))
    tgt = F.pad(ids[:, 1:], (0, 1), value=-100)
    tgt[0, :4] = -100
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, fast(ids).logits)
    assert_same_loss_and_gradients(plain, fast, ids, tgt)


@pytest.mark.parametrize("option", [dict(qk_norm=True), dict(hidden_act="relu2"), dict(logit_softcap=3.0)])
def test_fast_model_equals_plain_model_with_architecture_options(option):
    "QK-norm (through FastRMSNorm on 4-d queries), ReLU² and the soft-capped fused loss: same loss and gradients."
    plain, fast = (m.double().train() for m in twins(replace(CFG, **option)))
    with torch.no_grad():
        for m in (plain, fast):
            for p in m.parameters():
                p.mul_(3) if p.dim() == 2 else p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(p.numel()))
    ids = torch.randint(0, CFG.vocab_size, (2, 16))
    tgt = F.pad(ids[:, 1:], (0, 1), value=-100)
    assert_same_loss_and_gradients(plain, fast, ids, tgt)


@pytest.mark.parametrize("chunk", [0, 7])
def test_linear_cross_entropy_softcap_equals_autograd_fp64(chunk):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 16, dtype=torch.float64, generator=g).mul(3).requires_grad_()
    w = torch.randn(40, 16, dtype=torch.float64, generator=g).requires_grad_()
    t = torch.randint(0, 40, (50,), generator=g)
    t[::4] = -100
    z = x @ w.t()
    assert z.abs().max() > 6  # the cap binds
    ref = F.cross_entropy(5.0 * torch.tanh(z / 5.0), t, ignore_index=-100)
    rx, rw = torch.autograd.grad(ref, (x, w))
    got = linear_cross_entropy(x, w, t, chunk=chunk, cap=5.0)
    gx, gw = torch.autograd.grad(got, (x, w))
    assert abs(got.item() - ref.item()) < 1e-12
    assert (gx - rx).abs().max() < 1e-12 and (gw - rw).abs().max() < 1e-12


def test_targets_path_equals_labels_path_and_gradients():
    _, m = twins()
    m.train()
    ids = torch.randint(0, m.cfg.vocab_size, (2, 12))
    labels = ids.clone()
    labels[:, :3] = -100
    tgt = F.pad(labels[:, 1:], (0, 1), value=-100)
    ref = m(ids, labels=labels).loss
    ref_g = torch.autograd.grad(ref, list(m.parameters()))
    out = m(ids, targets=tgt)
    assert out.logits is None and abs(out.loss.item() - ref.item()) < 1e-5
    for a, b in zip(torch.autograd.grad(out.loss, list(m.parameters())), ref_g):
        assert (a - b).abs().max() < 1e-5
    with pytest.raises(ValueError, match="not both"):
        m(ids, labels=labels, targets=tgt)
    with pytest.raises(ValueError, match="targets shape"):
        m(ids, targets=tgt[:, :5])
    with pytest.raises(ValueError, match="every position"):
        m(ids, targets=tgt, logits_to_keep=1)


def test_bf16_autocast_training_loss_close_to_fp32():
    "The cast-once norms and the chunked loss together under bf16 autocast, against fp32 without autocast."
    _, m = twins(replace(CFG, tie_word_embeddings=True, num_key_value_heads=2, rope_theta=500000.0))
    m.train()
    ids = torch.randint(0, m.cfg.vocab_size, (4, 32))
    tgt = F.pad(ids[:, 1:], (0, 1), value=-100)
    ref = m(ids, targets=tgt).loss
    ref_g = torch.autograd.grad(ref, list(m.parameters()))
    with torch.autocast("cpu", torch.bfloat16):
        x = m.model.norm(torch.randn(2, 3, m.cfg.hidden_size))
        assert x.dtype == torch.bfloat16  # norms hand bf16 to the linears
        lo = m(ids, targets=tgt).loss
    assert lo.dtype == torch.float32 and abs(lo.item() - ref.item()) < 0.02
    cos = [F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
           for a, b in zip(torch.autograd.grad(lo, list(m.parameters())), ref_g)]
    assert min(cos) > 0.99, cos


def test_rms_norm_function_matches_autograd():
    norm = FastRMSNorm(24, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (3 * torch.randn(2, 7, 24, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFunction.apply(x, w, 1e-6, None), (x, norm.weight))
    dy = torch.randn(2, 7, 24, dtype=torch.float64)
    got = torch.autograd.grad(norm(x), (x, norm.weight), dy)
    ref = torch.autograd.grad(rms_norm(x, norm.weight, 1e-6), (x, norm.weight), dy)
    for a, b in zip(got, ref):
        assert (a - b).abs().max() < 1e-12
    norm.weight.requires_grad_(False)  # frozen gains, as under LoRA: dx only
    (gx,) = torch.autograd.grad(norm(x), x, dy)
    assert (gx - ref[0]).abs().max() < 1e-12
    norm = FastRMSNorm(24).float()
    xf = x.detach().float().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):  # autocast: bf16 out, the same bits as without grad
        y = norm(xf)
        with torch.no_grad():
            y0 = norm(xf)
    assert y.dtype == y0.dtype == torch.bfloat16 and torch.equal(y, y0)
    assert torch.equal(y0, rms_norm(xf, norm.weight, norm.eps).bfloat16())  # and the plain norm's, cast
    (gx,) = torch.autograd.grad(y, xf, dy.bfloat16())
    (rx,) = torch.autograd.grad(_rms_parts(xf, norm.weight, norm.eps, torch.bfloat16)[0], xf, dy.bfloat16())
    assert gx.dtype == torch.float32 and (gx - rx).abs().max() < 1e-5 * rx.abs().max()


def test_rope_function_matches_plain_expression():
    hd = 16
    cos, sin = rope_cos_sin(rope_inv_freq(hd, 500.0), torch.arange(3, 12)[None])
    x = torch.randn(2, 3, 9, hd, dtype=torch.float64, requires_grad=True)
    c64, s64 = cos.double(), sin.double()
    assert torch.autograd.gradcheck(lambda x: _RoPEFunction.apply(x, c64, s64), (x,))
    dy = torch.randn_like(x)
    (got,) = torch.autograd.grad(fast_rope(x, c64, s64), x, dy)
    (ref,) = torch.autograd.grad(x * c64[:, None] + rotate_half(x) * s64[:, None], x, dy)
    assert (got - ref).abs().max() < 1e-12
    xb = x.detach().bfloat16().requires_grad_()
    y = fast_rope(xb, cos, sin)  # no autocast: fp32, as the plain expression
    y0 = apply_rope(xb.detach(), cos, sin)
    assert y.dtype == y0.dtype == torch.float32 and torch.equal(y, y0)
    with torch.autocast("cpu", torch.bfloat16):  # autocast: bf16, the bits attention would cast to
        yb = fast_rope(xb, cos, sin)
    assert yb.dtype == torch.bfloat16 and torch.equal(yb, y0.bfloat16())
    (g,) = torch.autograd.grad(yb, xb, dy.bfloat16())
    assert g.dtype == torch.bfloat16
