"DPO: the loss against TRL's DPOTrainer on the same batch, the formula by hand, preference pairs, an empty preference set."
import math

import pytest
import torch

from microlm.config import ModelConfig
from microlm.dpo import (PairBatches, dpo_batch_loss, dpo_loss, encode_pair, pair_batch, preference_pairs,
                         reference_logps, task_reward, token_logps, trl_dpo_loss)
from microlm.model import MicroLM, hf_model
from microlm.tasks import SCHEMAS
from microlm.tokenizer import to_hf, train_bpe

torch.set_num_threads(1)  # tiny models: one thread is as fast, and does not fight other processes for the cores
TINY = ModelConfig(vocab_size=400, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                   intermediate_size=128, max_position_embeddings=128)


@pytest.fixture(scope="module")
def tok(play):
    return to_hf(train_bpe(play * 20 + '{"speaker":"Ber","first_word":"Who","line_count":1}', vocab_size=TINY.vocab_size))


@pytest.fixture(scope="module")
def models():
    "A policy and a reference that differ (so the loss is not log 2), as own models."
    torch.manual_seed(0)
    policy, ref = MicroLM(TINY), MicroLM(TINY)
    return policy.eval(), ref.eval()


def as_hf(model, tok):
    hf = hf_model(model.cfg, pad_token_id=tok.pad_token_id)
    hf.load_state_dict(model.state_dict(), strict=False)
    return hf.eval()


PAIRS = [
    dict(prompt=[dict(role="user", content="Who's there?")], chosen='{"speaker":"Ber"}', rejected="Nay, answer me"),
    dict(prompt=[dict(role="user", content="Answer with JSON only, keys speaker, first_word, line_count.\nBer.\nWho's there?")],
         chosen='{"speaker":"Ber","first_word":"Who","line_count":1}', rejected='{"speaker":"Fran","first_word":"Nay"}'),
    dict(prompt=[dict(role="system", content="JSON only."), dict(role="user", content="Long live the king!")],
         chosen='{"speaker":"Ber"}', rejected='{"speaker":"Ber"'),
]


@pytest.mark.parametrize("loss_type,weights,kind,sft_weight", [
    (("sigmoid",), None, "sigmoid", 0.0),
    (("ipo",), None, "ipo", 0.0),
    (("sigmoid", "sft"), [1.0, 0.5], "sigmoid", 0.5),  # RPO: DPO plus a weighted NLL of the chosen answers
])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_matches_trl(tok, models, loss_type, weights, kind, sft_weight, beta):
    "TRL's DPOTrainer (its tokenisation, collation and loss) vs own token_logps + dpo_loss on the batch TRL built."
    policy, ref = models
    want, batch = trl_dpo_loss(as_hf(policy, tok), tok, PAIRS, beta, loss_type, weights, ref_model=as_hf(ref, tok))
    ids = batch["input_ids"]
    x, labels = ids[:, :-1], ids.masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]
    with torch.no_grad():
        got, stats = dpo_batch_loss(policy, x, labels, token_logps(ref, x, labels).sum(-1), beta, kind, sft_weight)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert got.item() != pytest.approx(math.log(2), abs=1e-3) or kind != "sigmoid"   # policy and reference differ
    assert 0 <= stats["accuracy"] <= 1


def test_dpo_loss_by_hand():
    "The formula on numbers worked out by hand: -log sigmoid(beta * ((pc - rc) - (pr - rr)))."
    t = lambda *v: torch.tensor(v, dtype=torch.float64)
    # margins 3 and -1 (nats); beta 0.5 -> -log sigmoid(1.5), -log sigmoid(-0.5)
    got = dpo_loss(t(-10.0, -4.0), t(-21.0, -6.0), t(-12.0, -5.0), t(-20.0, -8.0), beta=0.5)
    want = [math.log(1 + math.exp(-1.5)), math.log(1 + math.exp(0.5))]
    assert got.tolist() == pytest.approx(want, rel=1e-12)
    ipo = dpo_loss(t(-10.0), t(-21.0), t(-12.0), t(-20.0), 0.5, "ipo", t(4.0), t(2.0))   # (2/4 + 1/2 - 1/(2*0.5))^2
    assert ipo.item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="'sigmoid' or 'ipo'"):
        dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), kind="kto")


def test_reference_logps_at_start_give_log2(tok, models):
    "A policy equal to its reference: implicit rewards 0, every pair's loss log 2, whatever the batch it is in."
    policy, _ = models
    enc = reference_logps(policy, [encode_pair(tok, p, 127) for p in PAIRS], tok.pad_token_id, batch_size=2)
    x, y = PairBatches(enc, 4, tok.pad_token_id, seed=3)()
    with torch.no_grad():
        loss, stats = dpo_batch_loss(policy, x, y["labels"], y["ref_logps"])
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5) and abs(stats["margin"]) < 1e-4
    # the answer-only labels: exactly the assistant's text and its end-of-turn token, for chosen and rejected rows
    B = len(x) // 2
    sup = lambda row: tok.decode([t for t in y["labels"][row].tolist() if t != -100])
    assert all(sup(i).endswith("<|im_end|>") for i in range(len(x)))
    assert {sup(i).removesuffix("<|im_end|>") for i in range(B)} <= {p["chosen"] for p in PAIRS}
    assert {sup(i).removesuffix("<|im_end|>") for i in range(B, 2 * B)} <= {p["rejected"] for p in PAIRS}


def _task():
    gold = {"speaker": "Ber", "first_word": "Who", "line_count": 1}
    return dict(id="play-0001-format", kind="format", gold=gold, schema=SCHEMAS["format"],
                messages=[dict(role="user", content="Answer with JSON only ..."),
                          dict(role="assistant", content='{"speaker":"Ber","first_word":"Who","line_count":1}')])


def test_preference_pairs():
    e, gold = _task(), _task()["messages"][1]["content"]
    half = '{"speaker":"Ber","first_word":"Nay","line_count":2}'       # 1 of 3 fields
    assert task_reward(gold, e) == 1.5 and task_reward(half, e) == pytest.approx(1 / 3)
    (p,) = preference_pairs([e], [[half, gold, "nothing"]])
    assert (p["chosen"], p["rejected"], p["chosen_reward"], p["rejected_reward"]) == (gold, "nothing", 1.5, 0.0)
    (p,) = preference_pairs([e], [[half, half]], chosen="gold")
    assert (p["chosen"], p["rejected"]) == (gold, half) and p["prompt"] == e["messages"][:1]
    assert preference_pairs([e], [[half, half]]) == []                              # no gap between samples
    assert preference_pairs([e], [[gold, "x"]], margin=2.0) == []                   # gap under the margin
    assert preference_pairs([e], [[gold]], chosen="gold") == []                     # the gold is no rejected answer


def test_empty_preference_set_is_a_clear_error(tok):
    with pytest.raises(ValueError, match="preference set is empty"):
        PairBatches([], 4, tok.pad_token_id)


def test_pair_batch_shapes(tok):
    enc = [encode_pair(tok, p, 64) for p in PAIRS]
    x, y = pair_batch(enc, tok.pad_token_id)
    assert x.shape[0] == 6 and y["labels"].shape == x.shape and y["ref_logps"].tolist() == [0.0] * 6
    moved = y.to("cpu")
    assert type(moved) is type(y) and set(moved) == {"labels", "ref_logps"}


def test_stage_with_no_pair_is_a_clear_error(smoke_run, tmp_path):
    "A margin no answer can clear leaves no pair: the stage stops with an error that says what to change."
    import shutil
    from dataclasses import replace
    from microlm.config import Run
    from microlm.dpo import dpo_stage
    for p in ("config.json", "data", "tokenizer", "tokens", "pretrain", "sft", ".stages"):
        (shutil.copytree if (smoke_run.root / p).is_dir() else shutil.copy2)(smoke_run.root / p, tmp_path / p)
    p = smoke_run.preset
    run = Run(tmp_path, replace(p, dpo=replace(p.dpo, chosen="best", margin=10.0)))
    with pytest.raises(ValueError, match=r"preference set is empty.*lower dpo.margin"):
        dpo_stage(run, progress=False, log=lambda line: None)
