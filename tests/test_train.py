"Invariants of the training loop: schedule, weight-decay groups, exact resume after SIGKILL, checkpoint errors, DDP, logs."
import copy, json, math, os, shutil, signal, subprocess, sys, textwrap
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from microlm.config import SMOKE, DataConfig, ModelConfig, Run, TrainConfig, amp_dtype, stable_hash
from microlm.model import MicroLM, load_model
from microlm.train import (CheckpointError, CheckpointMismatch, TokenWindows, eval_windows, latest_checkpoint, list_checkpoints,
                           Muon, Optimizers, fit_steps, lr_at, make_optimizer, next_token_loss, ramp_at, muon_split, param_groups, pretrain_stage, read_checkpoint, read_log, train)
from microlm.stages import is_current, stage_key

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                   intermediate_size=128, max_position_embeddings=64)
torch.set_num_threads(1)   # tiny models: one thread is as fast, and does not fight other processes for the cores
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def markov_tokens(n=20_000, vocab=64, seed=0):
    "Tokens from a random 4-successor Markov chain: learnable, not trivial."
    rng = np.random.default_rng(seed); nxt = rng.integers(0, vocab, (vocab, 4)); out = np.empty(n, np.uint16); t = 0
    for i, c in enumerate(rng.integers(0, 4, n)): t = nxt[t, c]; out[i] = t
    return out


def tiny_train(out, cfg, model_cfg=TINY, **kw):
    torch.manual_seed(0)
    toks = markov_tokens()
    meta = {"config_hash": stable_hash(asdict(cfg)), "model_config": asdict(model_cfg)}
    return train(MicroLM(model_cfg), TokenWindows(toks, cfg.batch_size, cfg.seq_len, seed=1), cfg, out,
                 valid=eval_windows(toks, cfg.eval_batches, cfg.batch_size, cfg.seq_len), bytes_per_token=1.0, meta=meta,
                 progress=False, **kw)


CFG = TrainConfig(batch_size=4, seq_len=32, max_steps=12, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=6, eval_batches=2,
                  ckpt_every=4, keep_ckpts=3, dtype="fp32")
MUON = replace(CFG, optimizer="muon", dropout=0.1)  # with residual dropout: its masks must resume exactly too
RAMP = replace(CFG, batch_ramp=6, seq_ramp=8, shuffle="epoch")  # killed at step 7: inside the sequence-length warmup


def test_schedule_shape():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    lrs = [lr_at(s, cfg) for s in range(cfg.max_steps + 1)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)        # linear warmup to the peak
    assert all(b > a for a, b in zip(lrs[:9], lrs[1:10]))
    assert all(b <= a for a, b in zip(lrs[10:], lrs[11:]))                         # then monotone decay
    assert lrs[60] == pytest.approx((1e-3 + 1e-4) / 2)                             # cosine midpoint
    assert lrs[110] == pytest.approx(1e-4) and lr_at(500, cfg) == pytest.approx(1e-4)  # ends (and stays) at min_lr


def test_weight_decay_groups():
    m = MicroLM(TINY)
    m.model.layers[0].mlp.up_proj.weight.requires_grad_(False)                     # a frozen matrix is left out
    decay, no_decay = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    n_trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)        # tied embedding counted once
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == n_trainable
    assert not any(p is m.model.layers[0].mlp.up_proj.weight for p in decay["params"])
    assert len(no_decay["params"]) == 2 * TINY.num_hidden_layers + 1               # the RMSNorm gains
    opt = make_optimizer(m, CFG)
    assert opt.defaults.get("fused") or opt.defaults.get("foreach")


def test_muon_takes_hidden_matrices_only():
    m = MicroLM(TINY)
    m.model.layers[0].mlp.up_proj.weight.requires_grad_(False)                     # a frozen matrix is left out
    hidden, rest = muon_split(m)
    assert len(hidden) == 7 * TINY.num_hidden_layers - 1 and all(p.ndim == 2 for p in hidden)
    assert any(p is m.model.embed_tokens.weight for p in rest)                     # embedding = tied head: AdamW
    assert sum(p.ndim == 1 for p in rest) == 2 * TINY.num_hidden_layers + 1       # the norm gains: AdamW
    assert not any(p is m.model.layers[0].mlp.up_proj.weight for p in hidden + rest)
    untied = MicroLM(replace(TINY, tie_word_embeddings=False))
    assert any(p is untied.lm_head.weight for p in muon_split(untied)[1])          # an untied head stays with AdamW too
    opt = make_optimizer(m, MUON)
    assert isinstance(opt, Optimizers) and [type(o) for o in opt.opts] == [Muon, torch.optim.AdamW]
    assert len(opt.param_groups) == 3 and all(g["lr"] == MUON.lr for g in opt.param_groups)
    adamw_state = make_optimizer(MicroLM(TINY), CFG).state_dict()
    with pytest.raises(ValueError, match="Muon"): opt.load_state_dict(adamw_state)  # a clear error, not a KeyError
    with pytest.raises(ValueError, match="optimizer"): TrainConfig(optimizer="adam")


def test_muon_is_torchs_muon_with_its_iterations_in_a_chosen_dtype():
    "bf16 iterations: torch.optim.Muon bit for bit (nesterov or not, its state loads into either); fp32: close to it."
    def steps(cls, n=3, state=None, **kw):
        torch.manual_seed(0)
        ws = [nn.Parameter(torch.randn(48, 32)), nn.Parameter(torch.randn(32, 80))]
        opt = cls(ws, lr=0.02, weight_decay=0.1, **kw)
        if state is not None:
            opt.load_state_dict(copy.deepcopy(state))  # loading keeps the buffers' tensors: a step would change them
        g = torch.Generator().manual_seed(1)
        for _ in range(n):
            for w in ws:
                w.grad = torch.randn(w.shape, generator=g)
            opt.step()
        return torch.cat([w.detach().flatten() for w in ws]), opt.state_dict()
    bf16 = lambda ps, **kw: Muon(ps, ns_dtype=torch.bfloat16, **kw)
    for kw in ({}, {"nesterov": False}, {"adjust_lr_fn": "match_rms_adamw"}):
        assert torch.equal(steps(torch.optim.Muon, **kw)[0], steps(bf16, **kw)[0]), kw
    state = steps(torch.optim.Muon, n=2)[1]
    assert torch.equal(steps(torch.optim.Muon, n=1, state=state)[0], steps(bf16, n=1, state=state)[0])
    theirs, ours = steps(torch.optim.Muon)[0], steps(lambda ps, **kw: Muon(ps, ns_dtype=torch.float32, **kw))[0]
    assert 0 < (ours - theirs).abs().max() < 1e-2
    auto = steps(Muon)[0]  # None: bf16 where amp_dtype picks bf16 autocast, else fp32
    assert torch.equal(auto, theirs if amp_dtype("cpu") else ours)
    with pytest.raises(ValueError, match="ns_dtype"):
        Muon([nn.Parameter(torch.zeros(2, 2))], ns_dtype=torch.float16)


def test_muon_learns(trained, trained_muon):
    "Same start, data and schedule as the AdamW run: Muon's validation loss falls (which is better at scale: 06_train)."
    va = [r["val_loss"] for r in read_log(trained[0]/"log.jsonl") if "val_loss" in r]
    vm = [r["val_loss"] for r in read_log(trained_muon[0]/"log.jsonl") if "val_loss" in r]
    assert vm[0] == va[0] and vm[-1] < vm[0] - 0.4 and vm != va, (va, vm)


RESUME_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    from test_train import CFG, MUON, RAMP, tiny_train
    from safetensors.torch import save_file
    out, kill_at, cfg = sys.argv[1], int(sys.argv[2]), {{"adamw": CFG, "muon": MUON, "ramp": RAMP}}[sys.argv[3]]
    def on_step(step, rec):
        if step == kill_at: os.kill(os.getpid(), signal.SIGKILL)     # a real, uncatchable kill mid-run
    s = tiny_train(out, cfg, on_step=on_step, log_every=1)
    print("done", s["steps"])
""")


def _final_weights(out):
    (ck,) = list_checkpoints(Path(out)/"ckpt")[-1:]
    return ck, load_file(str(ck/"model.safetensors"))


@pytest.mark.parametrize("optimizer", ["adamw", "muon", "ramp"])
def test_exact_resume_after_sigkill(optimizer, request, tmp_path):
    "Kill a run with SIGKILL after its step-4 checkpoint; the resumed run ends bit-identical to the uninterrupted one."
    trained = request.getfixturevalue({"adamw": "trained", "muon": "trained_muon", "ramp": "trained_ramp"}[optimizer])
    script = tmp_path/"run.py"; script.write_text(RESUME_SCRIPT.format(tests=str(Path(__file__).parent)))
    run = lambda out, kill: subprocess.run([sys.executable, str(script), str(out), str(kill), optimizer], env=ENV,
                                           capture_output=True, text=True)
    killed = run(tmp_path/"kill", 7)                              # after the step-4 checkpoint, before step 8's
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    assert [p.name for p in list_checkpoints(tmp_path/"kill"/"ckpt")] == ["step_000004"]
    resumed = run(tmp_path/"kill", -1)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout and "step 4" in resumed.stdout, resumed.stdout + resumed.stderr[-2000:]
    (ck_a, a), (ck_b, b) = _final_weights(trained[0]), _final_weights(tmp_path/"kill")   # `trained`: the same run, never killed
    assert ck_a.name == ck_b.name == "step_000012"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)   # bit-identical weights
    la, lb = read_log(trained[0]/"log.jsonl"), read_log(tmp_path/"kill"/"log.jsonl")
    assert [r["step"] for r in la] == [r["step"] for r in lb]                # the log has no duplicated steps
    assert [r.get("loss") for r in la] == [r.get("loss") for r in lb]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("ck")/"run"
    s = tiny_train(out, CFG, log_every=1)
    return out, s


@pytest.fixture(scope="module")
def trained_muon(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckm")/"run"
    return out, tiny_train(out, MUON, log_every=1)


def _meta(cfg=CFG, model_cfg=TINY): return {"config_hash": stable_hash(asdict(cfg)), "model_config": asdict(model_cfg)}


def test_log_and_plot(trained):
    out, s = trained
    log = read_log(out/"log.jsonl")
    ev = [r for r in log if "val_loss" in r]
    assert [r["step"] for r in ev] == [0, 6, 12] and all("val_bpb" in r for r in ev)
    assert ev[-1]["val_bpb"] == pytest.approx(ev[-1]["val_loss"] / math.log(2), rel=1e-4)   # bytes_per_token=1
    tr = [r for r in log if "loss" in r]
    assert [r["step"] for r in tr] == list(range(1, 13)) and all({"tokens", "lr", "tok_s"} <= set(r) for r in tr)
    assert ev[-1]["val_loss"] < ev[0]["val_loss"] - 0.5
    assert (out/"loss.png").stat().st_size > 1000
    assert [p.name for p in list_checkpoints(out/"ckpt")] == ["step_000004", "step_000008", "step_000012"]


def test_compiled_training_matches_eager(trained, tmp_path, monkeypatch):
    "cfg.compile=True (`--compile`): the torch.compile'd loop gives the eager run's losses and weights, saved under the plain names."
    compiled, real = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **kw: compiled.append(fn) or real(fn, *a, **kw))
    tiny_train(tmp_path/"c", replace(CFG, compile=True), log_every=1)
    assert compiled  # the step really went through torch.compile (equal numbers alone would not show it)
    le, lc = read_log(trained[0]/"log.jsonl"), read_log(tmp_path/"c"/"log.jsonl")
    assert [r["step"] for r in le] == [r["step"] for r in lc]
    for a, b in zip(le, lc):
        for k in ("loss", "val_loss"):
            if k in a: assert b[k] == pytest.approx(a[k], abs=2e-3), (a, b)
    (ck_e, e), (ck_c, c) = _final_weights(trained[0]), _final_weights(tmp_path/"c")
    assert ck_e.name == ck_c.name and e.keys() == c.keys()   # no `_orig_mod.` prefixes
    assert max((e[k] - c[k]).abs().max().item() for k in e) < 1e-3


def test_corrupt_latest_falls_back(trained, tmp_path):
    out = tmp_path/"run"; shutil.copytree(trained[0], out)
    wf = out/"ckpt"/"step_000012"/"model.safetensors"; wf.write_bytes(wf.read_bytes()[:100])          # truncated weights
    with pytest.raises(CheckpointError, match="step_000012/model.safetensors"):
        read_checkpoint(wf.parent, MicroLM(TINY), _meta())
    with pytest.warns(UserWarning, match="step_000012"):
        path, _, st = latest_checkpoint(out/"ckpt", MicroLM(TINY), _meta())
    assert path.name == "step_000008" and st["step"] == 8
    (out/"ckpt"/"step_000008"/"state.pt").write_bytes(b"garbage")                                     # garbage state
    with pytest.warns(UserWarning):
        path, _, st = latest_checkpoint(out/"ckpt", MicroLM(TINY), _meta())
    assert path.name == "step_000004"
    (out/"ckpt"/"step_000004"/"meta.json").write_text("{")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no readable checkpoint.*state.pt"):
        latest_checkpoint(out/"ckpt", MicroLM(TINY), _meta())


def test_resume_skips_corrupt_and_finishes(trained, tmp_path):
    "A run whose newest checkpoint is corrupt resumes from the previous one and ends with the same weights."
    out = tmp_path/"run"; shutil.copytree(trained[0], out)
    shutil.rmtree(out/"ckpt"/"step_000012"); shutil.rmtree(out/"ckpt"/"step_000004")
    (out/"ckpt"/"step_000008"/"state.pt").write_bytes(b"\x80\x02garbage")
    shutil.copytree(trained[0]/"ckpt"/"step_000004", out/"ckpt"/"step_000004")
    with pytest.warns(UserWarning, match="state.pt"):
        s = tiny_train(out, CFG, log_every=1)
    assert s["steps"] == 12
    a = load_file(str(trained[0]/"ckpt"/"step_000012"/"model.safetensors")); b = load_file(str(out/"ckpt"/"step_000012"/"model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fresh_start_discards_old_checkpoints(trained, tmp_path):
    "resume=False starts over: an earlier run's (later-step) checkpoints must not survive to be resumed or to evict the new ones."
    out = tmp_path/"run"; shutil.copytree(trained[0], out)
    s = tiny_train(out, replace(CFG, max_steps=4), resume=False)
    assert s["steps"] == 4 and [p.name for p in list_checkpoints(out/"ckpt")] == ["step_000004"]
    assert max(r["step"] for r in read_log(out/"log.jsonl")) == 4


@pytest.fixture(scope="module")
def trained_ramp(tmp_path_factory):
    out = tmp_path_factory.mktemp("ramp")
    shapes = []
    loss = lambda m, x, y: (m.training and shapes.append(tuple(x.shape))) or next_token_loss(m, x, y)  # training only
    return out, tiny_train(out, RAMP, log_every=1, loss_fn=loss), shapes


def test_ramp_at():
    cfg = TrainConfig(batch_size=16, seq_len=256, batch_ramp=100, seq_ramp=40)
    assert [ramp_at(s, cfg)[0] for s in (0, 50, 99, 100, 500)] == [4, 10, 15, 16, 16]   # a quarter, up to the batch
    assert [ramp_at(s, cfg)[1] for s in (0, 19, 20, 39, 40)] == [64, 64, 128, 128, 256]  # a quarter, a half, whole
    assert ramp_at(0, TrainConfig(batch_size=2, seq_len=8)) == (2, 8)                    # no warmups: constant
    with pytest.raises(ValueError, match="seq_len=30 is not a multiple of 4"): TrainConfig(seq_len=30, seq_ramp=10)
    with pytest.raises(ValueError, match="batch_ramp must be >= 0"): TrainConfig(batch_ramp=-1)


def test_ramps_in_training(trained_ramp, tmp_path):
    "The warmups shape the batches the model sees, count tokens by what it read, and need TokenWindows for the batch."
    out, s, shapes = trained_ramp
    want = [(ramp_at(i, RAMP)[0] * RAMP.seq_len // ramp_at(i, RAMP)[1], ramp_at(i, RAMP)[1]) for i in range(12)]
    assert shapes[:12] == want and want[0] == (4, 8) and want[7] == (8, 16) and want[8] == (4, 32)
    assert s["tokens"] == sum(b * t for b, t in want)
    assert [r["tokens"] for r in read_log(out/"log.jsonl") if "loss" in r][-1] == s["tokens"]
    toks = markov_tokens()
    listed = lambda: (torch.from_numpy(toks[:32].astype(np.int64))[None], torch.from_numpy(toks[1:33].astype(np.int64))[None])
    with pytest.raises(ValueError, match="batch_ramp=6 needs TokenWindows"):
        train(MicroLM(TINY), listed, RAMP, tmp_path/"x", progress=False)


def test_fit_steps():
    assert fit_steps(0, 100, 1.0, 5.0, 10, 1000) == 100                  # everything fits: the preset's steps
    assert fit_steps(0, 100, 1.0, 0.0, 10, 25.5) == 25                   # whole steps only
    assert fit_steps(0, 100, 1.0, 5.0, 10, 40) == 25                     # 25 steps + passes at 10, 20 and the final one
    assert fit_steps(0, 100, 1.0, 5.0, 10, 39.9) == 24                   # 24 + 3 passes = 39
    assert fit_steps(20, 100, 1.0, 5.0, 10, 15) == 30                    # from step 20: 10 steps + the pass at 30
    assert fit_steps(7, 100, 1.0, 1.0, 10, 0.5) == 7                     # no time left: stop where it is


def test_fit_minutes_fits_the_schedule(tmp_path):
    "A time budget lowers max_steps once after the warmup; the lr ends decayed; the fitted schedule survives a resume."
    cfg = replace(CFG, max_steps=100_000, eval_every=50, ckpt_every=100_000)
    s = tiny_train(tmp_path/"run", cfg, fit_minutes=0.05, log_every=1)
    assert s["steps"] == s["max_steps"] < cfg.max_steps
    log = [r for r in read_log(tmp_path/"run"/"log.jsonl") if "lr" in r]
    assert log[-1]["step"] == s["steps"] and log[-1]["lr"] < cfg.min_lr + 0.02 * (cfg.lr - cfg.min_lr)  # decayed to (nearly) min_lr
    assert [r["step"] for r in read_log(tmp_path/"run"/"log.jsonl") if "val_loss" in r][-1] == s["steps"]
    again = tiny_train(tmp_path/"run", cfg)                                # resumed without the budget: already done
    assert again["steps"] == again["max_steps"] == s["steps"]


def test_divergence_is_a_clear_error(tmp_path):
    nan_loss = lambda m, x, y: m(x).logits.float().mean() * float("nan")
    with pytest.raises(FloatingPointError, match="loss is nan at step 1.*diverged"):
        tiny_train(tmp_path/"run", CFG, loss_fn=nan_loss)


def test_mismatched_checkpoint(trained):
    out = trained[0]/"ckpt"
    other = replace(TINY, intermediate_size=192)
    with pytest.raises(CheckpointMismatch, match="intermediate_size: checkpoint 128 vs now 192"):
        latest_checkpoint(out, MicroLM(other), _meta(model_cfg=other))
    with pytest.raises(CheckpointMismatch, match="config hash"):
        latest_checkpoint(out, MicroLM(TINY), _meta(cfg=replace(CFG, lr=1e-3)))
    # the meta matches but the weights do not fit the model: named, not a load_state_dict crash
    with pytest.raises(CheckpointMismatch, match="model.safetensors: weights do not fit"):
        read_checkpoint(out/"step_000012", MicroLM(other), _meta())


# --- the pretrain stage on a small slice of the corpus (the smoke preset's model and training config) ---

@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from microlm.data import data_stage
    from microlm.tokenizer import tokenizer_stage
    p = replace(SMOKE, data=DataConfig(max_docs=6, valid_frac=0.17, test_frac=0.17))
    run = Run(tmp_path_factory.mktemp("smoke")/"run", p)
    data_stage(run); tokenizer_stage(run)
    return run


def test_pretrain_stage_smoke(smoke_run):
    run = smoke_run
    s = pretrain_stage(run, progress=False)
    assert s["steps"] == run.preset.pretrain.max_steps and {"val_loss", "val_bpb", "tokens", "tok_s", "params", "minutes"} <= set(s)
    ev = [r for r in read_log(run/"pretrain"/"log.jsonl") if "val_loss" in r]
    assert ev[-1]["val_loss"] < ev[0]["val_loss"] - 1.0, ev                       # loss falls (from ~ln 1024 = 6.9)
    bpt = json.loads((run/"tokens"/"meta.json").read_text())["bytes_per_token"]["valid"]
    assert s["val_bpb"] == pytest.approx(s["val_loss"] / math.log(2) / bpt, rel=1e-3)
    m = load_model(run/"pretrain")
    assert m.cfg == run.preset.model and (run/"pretrain"/"loss.png").exists()
    assert is_current(run, "pretrain") and pretrain_stage(run) == s                # current: returns at once


def test_pretrain_stage_errors(smoke_run, tmp_path):
    bad = Run(smoke_run.root, replace(smoke_run.preset, model=replace(smoke_run.preset.model, vocab_size=2048)))
    with pytest.raises(ValueError, match="vocab_size=2048.*vocab_size=1024"):
        pretrain_stage(bad, progress=False)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        pretrain_stage(Run(tmp_path/"empty", "smoke"), progress=False)


def test_pretrain_stage_restarts_over_other_config(smoke_run, tmp_path, capsys):
    "A stage made stale by a config change discards the old config's checkpoints and starts over (train() itself refuses them)."
    dst = _copy_inputs(smoke_run, tmp_path/"other")
    pretrain_stage(Run(dst, smoke_run.preset), progress=False)                    # checkpoints of the first configuration
    assert list_checkpoints(dst/"pretrain"/"ckpt")
    other = Run(dst, replace(smoke_run.preset, pretrain=replace(smoke_run.preset.pretrain, lr=1e-3)))
    s = pretrain_stage(other, progress=False, log_every=1)
    assert "starting over" in capsys.readouterr().out
    log = read_log(other/"pretrain"/"log.jsonl")
    assert [r for r in log if "loss" in r][0]["step"] == 1 and s["steps"] == other.preset.pretrain.max_steps  # not resumed at 40
    assert all(json.loads((c/"meta.json").read_text())["config_hash"] == stage_key(other, "pretrain") for c in list_checkpoints(other/"pretrain"/"ckpt"))


def _copy_inputs(run, dst):
    dst.mkdir(parents=True)
    for d in ("data", "tokenizer", "tokens", ".stages"): shutil.copytree(run.root/d, dst/d)
    shutil.copy(run.root/"config.json", dst/"config.json")
    (dst/".stages"/"pretrain.json").unlink(missing_ok=True)
    return dst


def test_ddp_two_processes_match_one(smoke_run, tmp_path):
    "torchrun with 2 gloo processes × batch B follows the loss curve of 1 process with batch 2B; the ranks end equal."
    steps, B = 20, 8
    common = ["--steps", str(steps), "--seq-len", "128", "--dtype", "fp32", "--log-every", "1", "--no-progress"]
    one, two = _copy_inputs(smoke_run, tmp_path/"one"), _copy_inputs(smoke_run, tmp_path/"two")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    r2 = subprocess.run(torchrun + ["-m", "microlm.train", "--run-dir", str(two), "--batch-size", str(B)] + common,
                        env=ENV, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stdout[-2000:] + r2.stderr[-4000:]  # `train` fails if the ranks' weights differ
    r1 = subprocess.run([sys.executable, "-m", "microlm.train", "--run", str(one), "--batch-size", str(2 * B)] + common,
                        env=ENV, capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr[-4000:]
    s1, s2 = json.loads(r1.stdout.strip().splitlines()[-1]), json.loads(r2.stdout.strip().splitlines()[-1])
    assert s2["world_size"] == 2 and s1["world_size"] == 1 and s1["tokens"] == s2["tokens"] == steps * 2 * B * 128
    l1 = [r["loss"] for r in read_log(one/"pretrain"/"log.jsonl") if "loss" in r]
    l2 = [r["loss"] for r in read_log(two/"pretrain"/"log.jsonl") if "loss" in r]
    assert len(l1) == len(l2) == steps
    # Not equal: the ranks draw other windows than the single process (rank-dependent seeds), and the gradient
    # all-reduce sums in another order. Same init, schedule and global batch give the same curve up to that noise.
    diff = float(np.mean(np.abs(np.array(l1) - np.array(l2))))
    print(f"DDP vs single-process mean |loss diff| = {diff:.4f}")
    assert diff < 0.05, (diff, l1, l2)
    assert l2[-1] < l2[0] - 1.0
    assert abs(s1["val_loss"] - s2["val_loss"]) < 0.05
    assert load_model(two/"pretrain").cfg == smoke_run.preset.model
