"RL (GRPO): the reward on hand-made answers, a reward of the wrong type, advantages, the clipped loss, exact resume after SIGKILL."
import json, math, os, shutil, signal, subprocess, sys, textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from microlm.config import SMOKE, ModelConfig, RLConfig, Run
from microlm.dpo import graded_answers, sample_answers, score_model, task_reward
from microlm.model import MicroLM
from microlm.rl import (
    Rollouts, answer_scores, best_of_n, check_reward, group_advantages, grpo_loss, grpo_loss_fn, rl_stage,
)
from microlm.tasks import SCHEMAS, aggregate, flatten
from microlm.tokenizer import to_hf, train_bpe
from microlm.train import list_checkpoints, read_log

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
torch.set_num_threads(1)  # tiny models: one thread is as fast, and does not fight other processes for the cores


def task(kind, gold, prompt="..."):
    return dict(id=f"play-0001-{kind}", kind=kind, gold=gold, schema=SCHEMAS[kind],
                messages=[dict(role="user", content=prompt), dict(role="assistant", content=json.dumps(gold))])


EXTRACT = task("extract", {"act": 1, "scene": 1, "speakers": ["Ber", "Fran"], "enter": ["Bernardo"], "exit": []})
REPAIR = task("repair", {"speaker": "Ber", "act": 1, "scene": 1, "words": 2})


@pytest.mark.parametrize("example,answer,want", [
    (REPAIR, '{"speaker":"Ber","act":1,"scene":1,"words":2}', 1.5),                 # exact and valid: F1 1 + bonus
    (REPAIR, ' ```json\n{"words":2,"scene":1,"act":1,"speaker":"Ber"}\n``` ', 1.5),  # fenced, other key order
    (REPAIR, '{"speaker":"Ber","act":1,"scene":1,"words":"2"}', 0.75),              # 3/4 fields; invalid: no bonus
    (REPAIR, '{"speaker":"Ber","act":1,"scene":1,"words":2,"note":"x"}', 2 * 4 / 9),  # an extra key: 4/5 vs 4/4
    (REPAIR, '{"speaker":"Ber","act":1}', 2 * 2 / 6),                              # half the fields
    (REPAIR, "Ber says two words in act 1, scene 1.", 0.0),                        # no JSON
    (EXTRACT, '{"act":1,"scene":1,"speakers":["Ber","Fran"],"enter":["Bernardo"],"exit":[]}', 1.5),
    (EXTRACT, '{"act":1,"scene":1,"speakers":["Fran","Ber"],"enter":["Bernardo"],"exit":[]}', 2 * 4 / 12),  # order
    (EXTRACT, '{"act":1,"scene":1,"speakers":["Ber"],"enter":[],"exit":[]}', 2 * 4 / 11),
])
def test_reward_on_hand_made_answers(example, answer, want):
    "Field F1 (2·tp / (predicted + gold leaves)) plus 0.5 for a valid, exact answer; list order counts, key order not."
    assert check_reward(task_reward(answer, example)) == pytest.approx(want)
    assert task_reward(answer, example, exact_bonus=0.0) == pytest.approx(min(want, 1.0))


def test_partial_credit():
    "A name closer to the gold earns more; exact answers and no JSON keep 1 and 0; weight 0 is the plain reward."
    from difflib import SequenceMatcher
    from microlm.dpo import partial_f1
    ans = lambda name: '{"speaker":"%s","act":1,"scene":1,"words":2}' % name
    gold = REPAIR["gold"]
    assert partial_f1(ans("Ber"), gold) == 1.0 and partial_f1("no JSON", gold) == 0.0
    assert partial_f1(ans("Xyz"), gold) < partial_f1(ans("Bex"), gold) < 1.0
    assert partial_f1(ans("Bex"), gold) == pytest.approx((3 + SequenceMatcher(None, '"Bex"', '"Ber"').ratio()) / 4)
    assert partial_f1('{"speaker":"Bex"}', gold) == pytest.approx(2 * 0.8 / 5)  # one of four gold fields, 0.8 alike
    assert task_reward(ans("Ber"), REPAIR, partial=1.0) == 1.5                    # exact: F1 1 + bonus either way
    half = task_reward(ans("Bex"), REPAIR, partial=0.5)
    assert half == pytest.approx(0.5 * 0.75 + 0.5 * partial_f1(ans("Bex"), gold))
    assert task_reward(ans("Bex"), REPAIR, partial=0.0) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="partial_credit"):
        RLConfig(partial_credit=1.5)


def test_invalid_penalty():
    "An answer that breaks its schema, is no JSON or goes on after it loses the penalty; a valid one keeps its reward."
    hack = '{"act":1,"scene":1,"speakers":["Ber","Fran"],"enter":["Bernardo"],"enter":[],"enter":[]}'  # and no exit
    for example, answer, valid in [
        (REPAIR, '{"speaker":"Ber","act":1,"scene":1,"words":2}', True),
        (REPAIR, '{"speaker":"Ber","act":1,"scene":1,"words":3}', True),    # valid, one field wrong
        (REPAIR, '{"speaker":"Ber","act":1,"scene":1,"words":"2"}', False),  # a string where the schema wants int
        (REPAIR, "Ber says two words in act 1, scene 1.", False),
        (REPAIR, '{"speaker":"Ber","act":1,"scene":1,"words":2} and so on, and so on', False),  # never stops
        (EXTRACT, hack, False),  # JSON keeps the last of repeated keys: enter is [], and exit is missing
    ]:
        plain = task_reward(answer, example)
        assert task_reward(answer, example, invalid_penalty=0.5) == pytest.approx(plain - 0.5 * (not valid))
    assert task_reward(hack, EXTRACT) == pytest.approx(2 * 4 / 11)  # act, scene, 2 speakers of 5 leaves vs 6 gold
    with pytest.raises(ValueError, match="invalid_penalty"):
        RLConfig(invalid_penalty=-0.5)


@pytest.mark.parametrize("value,error,match", [
    (True, TypeError, "got bool"), ({"f1": 1.0}, TypeError, "got dict"), (None, TypeError, "got NoneType"),
    ("1.0", TypeError, "got str"), (torch.tensor(1.0), TypeError, r"\.item\(\)"),
    (float("nan"), ValueError, "finite"), (float("inf"), ValueError, "finite"),
])
def test_reward_of_the_wrong_type(value, error, match):
    with pytest.raises(error, match=match):
        check_reward(value, "reward_fn on play-0001-repair")
    assert check_reward(1) == 1.0 and type(check_reward(1)) is float


TINY = ModelConfig(vocab_size=400, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                   intermediate_size=128, max_position_embeddings=128)


@pytest.fixture(scope="module")
def tok(play):
    return to_hf(train_bpe(play * 20 + '{"speaker":"Ber","act":1}', vocab_size=TINY.vocab_size))


def test_rollouts_check_the_reward(tok):
    "A reward function that returns a bool stops the run with an error naming the prompt, before any training."
    torch.manual_seed(0)
    m = MicroLM(TINY)
    bad = Rollouts(m, m, tok, [REPAIR], RLConfig(group_size=2, max_new_tokens=4), 1, reward_fn=lambda t, e: t == "")
    with pytest.raises(TypeError, match="reward_fn on play-0001-repair: a reward must be an int or float, got bool"):
        bad()


def test_rollouts_reuse_and_state(tok):
    "updates=2: each batch serves two calls, with the sampling policy's log-probs; a restored state samples the same."
    torch.manual_seed(0)
    m, ref = MicroLM(TINY), MicroLM(TINY)
    cfg = RLConfig(group_size=3, max_new_tokens=6, updates=2, drop_flat=False)
    ro = Rollouts(m, ref, tok, [REPAIR, EXTRACT], cfg, 2, seed=1)
    a, b, c, d = ro(), ro(), ro(), ro()
    assert a is b and c is d and c is not a and set(a[1]) == {"labels", "advantages", "ref_logps", "old_logps"}
    assert a[0].shape[0] == 6 and a[1]["advantages"].shape == (6,)
    st = ro.state_dict()
    e = ro()
    ro2 = Rollouts(m, ref, tok, [REPAIR, EXTRACT], cfg, 2, seed=99)
    ro2.load_state_dict(st)
    e2 = ro2()
    assert e is not c and torch.equal(e[0], e2[0]) and all(torch.equal(e[1][k], e2[1][k]) for k in e[1])
    ends = [row[row != -100][-1].item() for row in e[1]["labels"]]  # an answer that stopped ends with end of turn
    assert ro.stats["cut"] == sum(t != ro.eot for t in ends) / len(ends) > 0  # 6 tokens: random weights ramble on
    stats = {}
    loss = grpo_loss_fn(cfg, stats)(m, *a)       # the policy that sampled: ratio 1, nothing clipped
    assert math.isfinite(loss.item()) and stats["clipped"] == 0.0 and stats["kl"] > 0   # ref is another model


@pytest.mark.parametrize("drop_flat", [True, False])
def test_rollouts_drop_flat_groups(tok, drop_flat):
    "drop_flat: the answers of groups that all scored alike (here every repair prompt's) leave the loss's batch."
    torch.manual_seed(0)
    m, k, G = MicroLM(TINY), 3, 6
    count = iter(range(10**6))
    reward = lambda text, e: 1.0 if e["kind"] == "repair" else float(next(count))  # repair flat, extract not
    ro = Rollouts(m, m, tok, [REPAIR, EXTRACT], RLConfig(group_size=k, max_new_tokens=4, drop_flat=drop_flat), G,
                  seed=3, reward_fn=reward)
    x, y = ro()
    flat = round(ro.stats["flat_groups"] * G)
    assert 0 < flat < G  # this seed draws both kinds
    rows = (G - flat) * k if drop_flat else G * k
    assert x.shape[0] == rows == y["advantages"].shape[0] == y["ref_logps"].shape[0]
    groups = y["advantages"].view(-1, k)
    graded = groups.std(-1) > 0  # the extract groups; each one's advantages sum to 0
    assert graded.sum() == G - flat and graded.all() == drop_flat and groups.sum(-1).abs().max() < 1e-5


def test_best_of_n(tok):
    "answer_scores + best_of_n: one entry per power of two up to k, never falling with n, seeded; greedy is one answer."
    torch.manual_seed(0)
    m, ex = MicroLM(TINY).eval(), [REPAIR, EXTRACT, REPAIR]
    sc = answer_scores(m, tok, ex, k=6, max_new_tokens=6, seed=2)
    assert [len(row) for row in sc] == [6, 6, 6] and all(s["n_gold"] == len(flatten(e["gold"])) for e, row in
                                                       zip(ex, sc) for s in row)
    bk = best_of_n(sc)
    assert list(bk) == [1, 2, 4] and all(a["f1"] <= b["f1"] for a, b in zip(bk.values(), list(bk.values())[1:]))
    assert answer_scores(m, tok, ex, k=6, max_new_tokens=6, seed=2) == sc
    greedy = answer_scores(m, tok, ex, k=1, temperature=0.0, max_new_tokens=6)
    assert [len(row) for row in greedy] == [1, 1, 1] and greedy[0] == greedy[2]  # one prompt, one greedy answer
    for kw in (dict(temperature=0.0), dict(k=0), dict(temperature=-1.0)):
        with pytest.raises(ValueError, match="answer_scores: k >= 1 answers sampled at temperature > 0"):
            answer_scores(m, tok, ex, **kw)
    for bad in ([], [[]], [[greedy[0][0]], [greedy[0][0]] * 2]):
        with pytest.raises(ValueError, match="best_of_n: expected the same number"):
            best_of_n(bad)


def test_graded_answers_are_the_greedy_answer_scores(tok):
    "graded_answers (11_dpo): each greedy answer with its grades, as answer_scores grades it; score_model pools them."
    torch.manual_seed(0)
    m, ex = MicroLM(TINY).eval(), [REPAIR, EXTRACT, REPAIR]
    graded = graded_answers(m, tok, ex, max_new_tokens=6)
    assert [g for _, g in graded] == [row[0] for row in answer_scores(m, tok, ex, 1, 0.0, max_new_tokens=6)]
    assert graded[0] == graded[2] and all(isinstance(t, str) for t, _ in graded)  # one prompt, one answer
    assert score_model(m, tok, ex, max_new_tokens=6) == aggregate([g for _, g in graded])


def test_best_of_n_picks_by_f1_and_pools_like_the_leaderboard():
    "By hand: each prompt's best of its first n answers by F1 (the first of equals), fields pooled over prompts."
    def s(tp, n_pred, n_gold, exact=False):
        return dict(parsed=True, json_only=True, schema_valid=True, exact=exact, tp=tp, n_pred=n_pred, n_gold=n_gold,
                    missing=0, hallucinated=0)

    a = [s(0, 4, 4), s(2, 4, 4), s(1, 2, 4), s(4, 4, 4, exact=True)]  # F1 0, .5, .333, 1
    b = [s(1, 2, 2), s(0, 2, 2), s(2, 2, 2, exact=True), s(2, 2, 2, exact=True)]  # F1 .5, 0, 1, 1
    bk = best_of_n([a, b])
    assert bk[1] == {"f1": round(2 * 1 / (4 + 4 + 2 + 2), 4), "exact": 0.0}
    assert bk[2] == {"f1": round(2 * 3 / (4 + 4 + 2 + 2), 4), "exact": 0.0}  # a's second, b's first
    assert bk[4] == {"f1": 1.0, "exact": 1.0}


def test_group_advantages():
    r = torch.tensor([[1.0, 0.0, 0.5, 0.5], [0.3, 0.3, 0.3, 0.3]])
    a = group_advantages(r)
    assert a.sum(-1).abs().max() < 1e-6 and a[1].abs().max() == 0
    assert a[0].tolist() == pytest.approx(((r[0] - 0.5) / (r[0].std() + 1e-4)).tolist())
    assert group_advantages(r, scale=False)[0].tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])


def test_group_advantages_against_a_baseline():
    "ReMax: each reward minus the group's baseline (its greedy answer's reward), scaled by the std of both together."
    r = torch.tensor([[1.0, 0.0, 0.5, 0.5], [0.3, 0.3, 0.3, 0.3], [0.2, 0.2, 0.2, 0.2]])
    b = torch.tensor([0.5, 0.3, 0.6])
    assert group_advantages(r, scale=False, baseline=b).flatten().tolist() == pytest.approx(
        [0.5, -0.5, 0.0, 0.0] + [0.0] * 4 + [-0.4] * 4)  # the last: samples that agree, all below the greedy answer
    a = group_advantages(r, baseline=b)
    sd = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.6]).std()  # the four samples and their baseline
    assert a[2].tolist() == pytest.approx([-0.4 / (sd.item() + 1e-4)] * 4) and a[1].abs().max() == 0
    assert a[0].tolist() == pytest.approx(((r[0] - 0.5) / (torch.cat((r[0], b[:1])).std() + 1e-4)).tolist())
    with pytest.raises(ValueError, match="RLConfig: baseline must be one of \\('group', 'greedy'\\), got 'mean'"):
        RLConfig(baseline="mean")


def test_rollouts_greedy_baseline(tok):
    "baseline='greedy': each group's advantages are its rewards minus the reward of the policy's greedy answer."
    torch.manual_seed(0)
    m, k, G = MicroLM(TINY).eval(), 3, 4
    reward = lambda text, e: len(text) % 5 + 2.0 * (e["kind"] == "repair")  # graded, and apart by prompt
    cfg = RLConfig(group_size=k, max_new_tokens=6, drop_flat=False, scale_rewards=False, baseline="greedy")
    ro = Rollouts(m, m, tok, [REPAIR, EXTRACT], cfg, G, seed=3, reward_fn=reward)
    x, y = ro()
    gen = torch.Generator().manual_seed(3)  # the draws Rollouts makes: the prompts, then the sampling seed
    drawn = [[REPAIR, EXTRACT][i] for i in torch.randint(2, (G,), generator=gen)]
    seed = int(torch.randint(2**31, (1,), generator=gen))
    assert {e["kind"] for e in drawn} == {"repair", "extract"}  # this seed draws both prompts
    greedy = [reward(g[0].text, e) for g, e in zip(sample_answers(m, tok, drawn, 1, 0.0, 6), drawn)]
    assert len(set(greedy)) > 1  # the baselines differ by prompt
    sampled = torch.tensor([[reward(a.text, e) for a in gs] for gs, e in
                            zip(sample_answers(m, tok, drawn, k, cfg.temperature, 6, seed, G * k), drawn)])
    # each group against its own prompt's greedy answer: a permuted or pooled baseline would not match
    assert torch.allclose(y["advantages"].view(G, k), sampled - torch.tensor(greedy)[:, None], atol=1e-5)
    assert ro.stats["reward_greedy"] == pytest.approx(sum(greedy) / G)
    assert ro.stats["reward"] == pytest.approx(sampled.mean().item())
    group = Rollouts(m, m, tok, [REPAIR, EXTRACT], replace(cfg, baseline="group"), G, seed=3, reward_fn=reward)
    xg, yg = group()
    assert torch.equal(x, xg) and "reward_greedy" not in group.stats   # the same samples, measured against their mean
    assert torch.allclose(yg["advantages"].view(G, k), sampled - sampled.mean(-1, keepdim=True), atol=1e-5)
    # positive_only: the same samples; an extract answer scores what its greedy answer scores, so nothing there beats it
    reward2 = lambda text, e: len(text) % 5 if e["kind"] == "repair" else 1.0
    plain = Rollouts(m, m, tok, [REPAIR, EXTRACT], cfg, G, seed=3, reward_fn=reward2)()[1]["advantages"].view(G, k)
    pos = Rollouts(m, m, tok, [REPAIR, EXTRACT], replace(cfg, positive_only=True, drop_flat=True), G, seed=3,
                   reward_fn=reward2)
    xp, yp = pos()
    kept = plain.gt(0).any(-1)  # groups where some sample beats the greedy answer; the others leave the batch
    assert 0 < kept.sum() < G and pos.stats["flat_groups"] == 1 - kept.float().mean().item()
    assert torch.allclose(yp["advantages"], plain[kept].clamp(min=0).flatten()) and xp.shape[0] == kept.sum() * k


def test_grpo_loss_gradient():
    "At ratio 1 the gradient of the loss is -A / (answer tokens) per token: the plain policy gradient, token-averaged."
    torch.manual_seed(0)
    lp = torch.randn(3, 5).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]]).float()
    adv = torch.tensor([1.0, -0.5, 2.0])
    loss, st = grpo_loss(lp, lp.detach(), lp.detach(), adv, mask)
    loss.backward()
    assert torch.allclose(lp.grad, -adv[:, None] * mask / mask.sum()) and st["kl"] == 0 and st["clipped"] == 0
    # past the clip the gradient vanishes; the KL penalty pulls towards the reference
    lp2 = (lp.detach() + 1.0).requires_grad_()
    loss2, st2 = grpo_loss(lp2, lp.detach(), lp.detach(), adv.abs(), mask, clip_eps=0.2, kl_coef=0.1)
    loss2.backward()
    kl_grad = 0.1 * (1 - torch.exp(-torch.ones(3, 5))) * mask / mask.sum()   # d/dlogp of e^(ref-lp) - (ref-lp) - 1
    assert torch.allclose(lp2.grad, kl_grad, atol=1e-6) and st2["clipped"] == 1.0 and st2["kl"] > 0


RESUME = textwrap.dedent("""
    import os, signal, sys, torch
    torch.set_num_threads(1)
    from microlm.config import Run
    from microlm.rl import rl_stage
    run, kill_at = Run(sys.argv[1]), int(sys.argv[2])
    def on_step(step, rec):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)     # a real, uncatchable kill mid-run
    s = rl_stage(run, progress=False, on_step=on_step)
    print("done", s["steps"])
""")


def _copy_run(src: Run, dst: Path) -> Path:
    "A run folder with what RL needs: config, tokenizer, data, the SFT model and the records of the stages before."
    (dst / ".stages").mkdir(parents=True)
    for p in ("config.json", "data", "tokenizer", "tokens", "pretrain", "sft"):
        (shutil.copytree if (src.root / p).is_dir() else shutil.copy2)(src.root / p, dst / p)
    for s in ("data", "tokenizer", "pretrain", "sft"):
        shutil.copy2(src.root / ".stages" / f"{s}.json", dst / ".stages" / f"{s}.json")
    return dst


def test_rl_exact_resume_after_sigkill(smoke_run, tmp_path):
    "Kill the RL stage with SIGKILL after its step-2 checkpoint; the resumed run ends bit-identical to an uninterrupted one."
    assert SMOKE.rl_train.ckpt_every == 2 and SMOKE.rl_train.max_steps == 6 and SMOKE.rl_train.keep_ckpts == 1
    script = tmp_path / "rl.py"
    script.write_text(RESUME)
    go = lambda run, kill: subprocess.run([sys.executable, str(script), str(run), str(kill)], env=ENV,
                                          capture_output=True, text=True)
    a, b = _copy_run(smoke_run, tmp_path / "a"), _copy_run(smoke_run, tmp_path / "b")
    assert rl_stage(Run(a), progress=False, log=lambda line: None)["steps"] == 6   # uninterrupted, in this process
    killed = go(b, 3)                                                  # after the step-2 checkpoint, before step 4's
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])
    assert [p.name for p in list_checkpoints(b / "rl" / "ckpt")] == ["step_000002"]
    assert not (b / "rl" / "model.safetensors").exists()
    resumed = go(b, -1)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout and "step 2" in resumed.stdout, \
        resumed.stdout + resumed.stderr[-3000:]
    wa, wb = load_file(str(a / "rl" / "model.safetensors")), load_file(str(b / "rl" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)       # bit-identical weights
    keys = ("step", "loss", "reward", "kl", "length", "heldout_f1", "heldout_exact")
    la, lb = ([{k: r[k] for k in keys if k in r} for r in read_log(x / "rl" / "log.jsonl")] for x in (a, b))
    assert sorted(la, key=lambda r: (r["step"], sorted(r))) == sorted(lb, key=lambda r: (r["step"], sorted(r)))
    assert [r["step"] for r in la if "reward" in r] == list(range(1, 7))               # no step twice, none missing
    assert [r["step"] for r in la if "heldout_f1" in r] == [0, 3, 6]
    assert (b / "rl" / "rl.png").stat().st_size > 1000
    assert json.loads((b / ".stages" / "rl.json").read_text())["summary"]["steps"] == 6


def test_rl_on_fresh_prompts(smoke_run, tmp_path):
    "rl.fresh_tasks_per_play: RL trains on new train-play tasks, none of them a prompt SFT trained on."
    from microlm.dpo import sft_tasks
    from microlm.rl import fresh_tasks
    from microlm.speedrun import apply_overrides
    from microlm.tokenizer import load_tokenizer
    with pytest.raises(ValueError, match="fresh_tasks_per_play must be >= 0"):
        RLConfig(fresh_tasks_per_play=-1)
    run = Run(_copy_run(smoke_run, tmp_path / "run"), apply_overrides(SMOKE, {"rl": {"fresh_tasks_per_play": 3}}))
    run.save_config()
    tok, L = load_tokenizer(run / "tokenizer"), SMOKE.rl_train.seq_len
    fresh, sft = fresh_tasks(run, tok, 3, L), sft_tasks(run, "train", math.inf)
    assert fresh and not {e["messages"][0]["content"] for e in fresh} & {e["messages"][0]["content"] for e in sft}
    assert all(e["id"].startswith("rl-") and e["n_tokens"] <= L for e in fresh)
    assert {e["kind"] for e in fresh} == {e["kind"] for e in sft}
    assert fresh_tasks(run, tok, 3, L) == fresh                                     # the same tasks on every call
    summary = rl_stage(run, progress=False, log=lambda line: None)
    assert summary["train_prompts"] == len(fresh) != len(sft_tasks(run, "train", L)) and summary["steps"] == 6
    with pytest.raises(ValueError, match="no new task fits rl_train.seq_len=4"):
        fresh_tasks(run, tok, 3, 4)
