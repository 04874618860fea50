"Invariants and bad input for microlm.sft: play parsing, task golds, schema checks, loaders, the loss mask, batching."
import json, random
import pytest, torch
from microlm.sft import (KINDS, SCHEMAS, SFTBatches, _corrupt, chat_examples, collate, encode_chat, load_alpaca,
                         load_conversations, make_task, moves, next_token_xy, numeral, parse_play, play_tasks, schema_errors,
                         schema_valid)

PLAY = """HAMLET

ACT I.

Scene I. Elsinore. A platform before the Castle.

[Francisco at his post. Enter to him Bernardo.]

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.

Ber.
Long live the king!

[Enter Horatio and Marcellus.]

Hor.
Friends to this ground.

Mar.
And liegemen to the Dane.

[Exit.]

ACT 2
SCENE 1
[Enter PROSPERO and MIRANDA]

MIRANDA.
If by your art, my dearest father, you have
Put the wild waters in this roar, allay them.

PROSPERO
Be collected:
No more amazement.

[Exeunt.]
"""

@pytest.fixture(scope="module")
def tok():
    from microlm.tokenizer import to_hf, train_bpe
    return to_hf(train_bpe(PLAY * 20 + '{"speaker":"A","act":1}', vocab_size=400))

def test_numeral_and_parse():
    assert [numeral(s) for s in ("XIV", "2", "THIRD", "Who")] == [14, 2, 3, None]
    blocks = parse_play(PLAY)
    sp = [(b["speaker"], b["act"], b["scene"]) for b in blocks if b["type"] == "speech"]
    assert sp == [("Ber", 1, 1), ("Fran", 1, 1), ("Ber", 1, 1), ("Hor", 1, 1), ("Mar", 1, 1), ("MIRANDA", 2, 1), ("PROSPERO", 2, 1)]
    assert [b for b in blocks if b["type"] == "speech"][-1]["lines"] == ["Be collected:", "No more amazement."]

def test_moves():
    assert moves("[Enter KING, QUEEN, and Attendants.]") == (["KING", "QUEEN", "Attendants"], [])
    assert moves("[Exit.]", "Mar") == ([], ["Mar"]) and moves("[Exeunt.]") == ([], ["all"])
    assert moves("[Exeunt all but Hamlet.]") == ([], [])

@pytest.mark.parametrize("seed", range(20))
def test_every_corruption_breaks_the_schema(seed):
    gold = {"speaker": "Pol", "act": 2, "scene": 1, "words": 7}
    broken, how = _corrupt(gold, random.Random(seed))
    try: obj = json.loads(broken)
    except json.JSONDecodeError: assert how in ("quote", "brace"); return
    assert not schema_valid(obj, SCHEMAS["repair"]), (how, broken)

def test_schema_valid_agrees_with_jsonschema():
    jsonschema = pytest.importorskip("jsonschema")
    objs = [{"speaker": "A", "first_word": "B", "line_count": 2}, {"speaker": "A", "first_word": "B", "line_count": True},
            {"speaker": "A", "first_word": "B"}, {"speaker": "A", "first_word": "B", "line_count": 1, "x": 1},
            {"lines": [{"speaker": "A", "text": "t"}]}, {"lines": [{"speaker": 1, "text": "t"}]}, [], "x"]
    for o in objs:
        for k, s in SCHEMAS.items():
            assert schema_valid(o, s) == jsonschema.Draft202012Validator(s).is_valid(o), (o, k, schema_errors(o, s))

def test_tasks_are_deterministic_valid_and_fit():
    fits = lambda m: len(m[0]["content"]) + len(m[1]["content"]) <= 260
    a, da = play_tasks("p", PLAY, 12, seed=1, fits=fits)
    b, _ = play_tasks("p", PLAY, 12, seed=1, fits=fits)
    assert a == b and len(a) == 12 and {e["kind"] for e in a} == set(KINDS)
    for e in a:
        assert fits(e["messages"]) and schema_valid(e["gold"], e["schema"]) and json.loads(e["messages"][1]["content"]) == e["gold"]
        if e["kind"] == "format":   # the gold is computed from the text shown
            shown = e["messages"][0]["content"].split("\n")
            assert e["gold"]["line_count"] == len(shown) - 2 and shown[2].startswith(e["gold"]["first_word"])
    assert make_task("extract", parse_play(PLAY), random.Random(0), fits=lambda m: False) is None

def test_chat_examples():
    c = chat_examples(50, seed=3)
    assert len(c["train"]) == 50 and c == chat_examples(50, seed=3) and c != chat_examples(50, seed=4)
    assert all(m["role"] in ("user", "assistant") for s in c for e in c[s] for m in e["messages"])
    assert len(c["valid"]) > 0 and len(c["test"]) > 0

def test_loaders(tmp_path):
    f = tmp_path/"c.jsonl"
    f.write_text('{"conversations":[{"from":"system","value":"Be brief."},{"from":"human","value":"Hi"},{"from":"gpt","value":"Hey"}]}\n\n'
                 '{"conversations":[{"role":"user","content":"1+1"},{"role":"assistant","content":"2"}]}\n')
    ex = load_conversations(f)
    assert [m["role"] for m in ex[0]["messages"]] == ["system", "user", "assistant"] and ex[1]["messages"][1]["content"] == "2"
    bad = tmp_path/"bad.jsonl"
    bad.write_text('{"conversations":[{"role":"user","content":"1+1"},{"role":"assistant","content":"2"}]}\n{"conversations": []}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with a non-empty \"conversations\" list"): load_conversations(bad)
    bad.write_text('{"conversations":[{"role":"user","content":"q"}]}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: the conversation has no assistant turn"): load_conversations(bad)
    bad.write_text('not json\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: not valid JSON"): load_conversations(bad)
    a = tmp_path/"a.jsonl"
    a.write_text('{"instruction":"Add","input":"1 and 2","output":"3"}\n{"instruction":"Add","output":3}\n')
    with pytest.raises(ValueError, match=r"a.jsonl:2: expected \{\"instruction\": str"): load_alpaca(a)
    a.write_text('{"instruction":"Add","input":"1 and 2","output":"3"}\n')
    assert load_alpaca(a)[0]["messages"] == [{"role": "user", "content": "Add\n\n1 and 2"}, {"role": "assistant", "content": "3"}]
    with pytest.raises(FileNotFoundError): load_alpaca(tmp_path/"missing.jsonl")

def test_loss_mask_is_the_assistant_turns(tok):
    msgs = [{"role": "system", "content": "JSON only."}, {"role": "user", "content": "Who's there?"},
            {"role": "assistant", "content": '{"speaker":"Ber"}'}, {"role": "user", "content": "And?"},
            {"role": "assistant", "content": "Long live the king!"}]
    enc = encode_chat(tok, msgs)
    ref = tok.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    assert enc["input_ids"] == ref["input_ids"]
    assert [l != -100 for l in enc["labels"]] == [bool(m) for m in ref["assistant_masks"]]
    sup = [i for i, l in zip(enc["input_ids"], enc["labels"]) if l != -100]
    assert tok.decode(sup) == '{"speaker":"Ber"}<|im_end|>Long live the king!<|im_end|>'
    assert encode_chat(tok, msgs, max_len=7)["input_ids"] == enc["input_ids"][:7]

def test_collate_and_batches(tok):
    encs = [encode_chat(tok, [{"role": "user", "content": "q" * n}, {"role": "assistant", "content": "a"}]) for n in (1, 5, 9)]
    b = collate(encs, pad_id=3)
    L = [len(e["input_ids"]) for e in encs]
    assert b["input_ids"].shape == (3, max(L)) and b["attention_mask"].sum(1).tolist() == L
    assert (b["input_ids"][b["attention_mask"] == 0] == 3).all() and (b["labels"][b["attention_mask"] == 0] == -100).all()
    x, y = next_token_xy(b)
    assert torch.equal(x, b["input_ids"][:, :-1]) and torch.equal(y, b["labels"][:, 1:])
    s = SFTBatches(encs, 2, 3, seed=0); s(); st = s.state_dict(); nxt = s()
    s2 = SFTBatches(encs, 2, 3, seed=99); s2.load_state_dict(st)
    assert all(torch.equal(u, v) for u, v in zip(s2(), nxt))
    with pytest.raises(ValueError, match="no examples"): SFTBatches([], 2, 3)
