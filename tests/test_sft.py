"Invariants and bad input for microlm.sft: conversation loaders, the loss mask, batching."
import pytest, torch
from microlm.sft import SFTBatches, chat_examples, collate, encode_chat, load_alpaca, load_conversations, next_token_xy
from microlm.tokenizer import to_hf, train_bpe

@pytest.fixture(scope="module")
def tok(play):
    return to_hf(train_bpe(play * 20 + '{"speaker":"A","act":1}', vocab_size=400))

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

def test_length_groups_pad_less_and_resume():
    lens = torch.randint(3, 60, (50,), generator=torch.Generator().manual_seed(0)).tolist()
    encs = [dict(input_ids=[5] * n, labels=[5] * n) for n in lens]
    width = lambda ix: max(len(encs[i]["input_ids"]) for i in ix)
    s = SFTBatches(encs, 4, 0, seed=1, groups=8)
    draw = [s.indices() for _ in range(8)]                                       # one whole draw of 8 batches
    flat = sorted((i for b in draw for i in b), key=lambda i: len(encs[i]["input_ids"]))
    assert len(flat) == 32
    assert sum(map(width, draw)) == sum(width(flat[j:j + 4]) for j in range(0, 32, 4))  # cut from the sorted draw
    shuffled = torch.randperm(32, generator=torch.Generator().manual_seed(2)).tolist()
    assert sum(map(width, draw)) < sum(width([flat[k] for k in shuffled[j:j + 4]]) for j in range(0, 32, 4))
    assert draw != sorted(draw, key=width)                                       # served in random order
    s.indices(); st = s.state_dict(); nxt = [s() for _ in range(10)]             # resume mid-draw and across draws
    s2 = SFTBatches(encs, 4, 0, seed=99, groups=8); s2.load_state_dict(st)
    assert all(torch.equal(u, v) for a, b in zip([s2() for _ in range(10)], nxt) for u, v in zip(a, b))
    plain = SFTBatches(encs, 4, 0, seed=1)                                       # groups=0: the draws of before
    g = torch.Generator().manual_seed(1)
    assert plain.indices() == torch.randint(50, (4,), generator=g).tolist()
    from microlm.sft import padded_share
    assert padded_share(encs, 4, 8) < padded_share(encs, 4) and padded_share(encs[:1] * 9, 4) == 0
    from microlm.config import TrainConfig
    with pytest.raises(ValueError, match="length_groups"): TrainConfig(length_groups=-1)
