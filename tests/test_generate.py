"Invariants of microlm.generate: KV cache == no cache, batched == one by one, == transformers, seeds, stops, bad input."
from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

from microlm.config import SMOKE
from microlm.generate import (Generation, HFCausalLM, SamplingParams, apply_repetition_penalty, apply_top_k, apply_top_p,
                              generate, generate_text, holdback, left_pad, stream_ids, stream_text)
from microlm.model import MicroLM, to_hf_config
from microlm.tokenizer import to_hf, train_bpe

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21], [30, 31, 32, 33, 34]]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)  # tiny models: threads only add contention
    yield
    torch.set_num_threads(n)


def lively(model, std=0.3, seed=0):
    "Random weights with a large spread: greedy output varies instead of repeating the last prompt token."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2: p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return lively(MicroLM(replace(SMOKE.model, max_position_embeddings=64)))


@pytest.fixture(scope="module")
def tok():
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 5
    return to_hf(train_bpe(text + "héllo wörld 日本語", vocab_size=300))


def ids_of(gens): return [g.ids for g in gens]


def test_output_is_not_degenerate(model):  # otherwise the equality tests below would prove little
    out = generate(model, PROMPTS, 16)
    assert all(len(set(g.ids)) > 4 for g in out)


def test_cached_equals_uncached_batch1(model):
    for p in PROMPTS:
        assert generate(model, p, 20)[0].ids == generate(model, p, 20, use_cache=False)[0].ids


def test_cached_equals_uncached_batched(model):
    assert ids_of(generate(model, PROMPTS, 20)) == ids_of(generate(model, PROMPTS, 20, use_cache=False))


def test_batched_equals_one_by_one(model):
    assert ids_of(generate(model, PROMPTS, 20)) == [generate(model, p, 20)[0].ids for p in PROMPTS]


def test_tensor_and_list_prompts_agree(model):
    assert generate(model, torch.tensor(PROMPTS[0]), 8)[0].ids == generate(model, PROMPTS[0], 8)[0].ids
    assert generate(model, torch.tensor([PROMPTS[0]]), 8)[0].ids == generate(model, PROMPTS[0], 8)[0].ids


def hf_twin(model):
    hf = LlamaForCausalLM(LlamaConfig(**to_hf_config(model.cfg))).eval()
    hf.load_state_dict(model.state_dict())
    return hf


def test_greedy_matches_transformers(model):
    hf = hf_twin(model)
    ids, mask = left_pad(PROMPTS)
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)[:, ids.size(1):]
    ours = generate(model, PROMPTS, 16)
    assert ref.tolist() == ids_of(ours)
    assert ids_of(generate(HFCausalLM(hf), PROMPTS, 16)) == ids_of(ours)


def test_repetition_penalty_matches_transformers():
    torch.manual_seed(0)
    plain = MicroLM(replace(SMOKE.model, max_position_embeddings=64)).eval()  # small init: greedy repeats itself
    hf, p = hf_twin(plain), PROMPTS[0]
    assert len(set(generate(plain, p, 16)[0].ids)) < 4
    ours = generate(plain, p, 16, repetition_penalty=3.0)[0].ids
    assert ours != generate(plain, p, 16)[0].ids
    ref = hf.generate(input_ids=torch.tensor([p]), max_new_tokens=16, do_sample=False, pad_token_id=0, repetition_penalty=3.0)
    assert ref[0, len(p):].tolist() == ours


def test_seed_reproduces(model):
    a = generate(model, PROMPTS, 16, temperature=1.0, top_p=0.9, seed=3)
    b = generate(model, PROMPTS, 16, temperature=1.0, top_p=0.9, seed=3)
    c = generate(model, PROMPTS, 16, temperature=1.0, top_p=0.9, seed=4)
    assert ids_of(a) == ids_of(b) and ids_of(a) != ids_of(c)
    torch.manual_seed(0); d = generate(model, PROMPTS, 16, temperature=1.0)
    torch.manual_seed(0); e = generate(model, PROMPTS, 16, temperature=1.0)
    assert ids_of(d) == ids_of(e)  # no seed: follows torch.manual_seed


def test_sampling_cached_equals_uncached(model):
    assert ids_of(generate(model, PROMPTS, 16, temperature=0.9, seed=1)) == \
           ids_of(generate(model, PROMPTS, 16, temperature=0.9, seed=1, use_cache=False))


def test_top_k_1_is_greedy(model):
    assert ids_of(generate(model, PROMPTS, 16, temperature=1.5, top_k=1, seed=0)) == ids_of(generate(model, PROMPTS, 16))


def test_processors_match_transformers():
    g = torch.Generator().manual_seed(0)
    logits, seen = torch.randn(5, 40, generator=g) * 3, torch.randint(0, 40, (5, 9), generator=g)
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.7), RepetitionPenaltyLogitsProcessor(1.7)(seen, logits.clone()))
    for k in (1, 5, 40, 100): assert torch.equal(apply_top_k(logits, k), TopKLogitsWarper(k)(seen, logits))
    for p in (0.01, 0.5, 0.95, 1.0): assert torch.equal(apply_top_p(logits, p), TopPLogitsWarper(p)(seen, logits))
    mask = torch.ones_like(seen); mask[:, :4] = 0
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.7, mask), RepetitionPenaltyLogitsProcessor(1.7)(seen[:, 4:], logits.clone()))


def test_stop_token(model):
    full = generate(model, PROMPTS, 20)
    for p, g in zip(PROMPTS, full):
        stop = g.ids[5]
        out = generate(model, p, 20, stop_token_ids=[stop])[0]
        assert out.ids == g.ids[:g.ids.index(stop)] and out.finish_reason == "stop"
    batched = generate(model, PROMPTS, 20, stop_token_ids=[full[0].ids[3]])
    assert batched[0].ids == full[0].ids[:full[0].ids.index(full[0].ids[3])]
    assert batched[1].ids == generate(model, PROMPTS[1], 20, stop_token_ids=[full[0].ids[3]])[0].ids  # other rows unaffected


def test_stop_string(tok):
    m = lively(MicroLM(replace(SMOKE.model, vocab_size=len(tok))), seed=2)
    full = generate_text(m, tok, "To be", 30, stop_token_ids=[])
    assert len(full) > 8
    stop = full[4:7]
    out = generate(m, tok.encode("To be"), 30, tokenizer=tok, stop_strings=[stop, "\x00never"])[0]
    assert out.finish_reason == "stop" and out.text == full[:full.index(stop)]
    assert generate_text(m, tok, "To be", 30, stop_token_ids=[], stop_strings=[stop]) == full[:full.index(stop)]


def test_stream_text_joins_to_generate_text(tok):
    m = lively(MicroLM(replace(SMOKE.model, vocab_size=len(tok))), seed=2)
    for kw in (dict(), dict(temperature=1.0, seed=5)):
        deltas = list(stream_text(m, tok, "héllo", 30, stop_token_ids=[], **kw))
        assert "".join(deltas) == generate_text(m, tok, "héllo", 30, stop_token_ids=[], **kw)
    it = stream_ids(m, tok.encode("To be"), 10)
    got = []
    try:
        while True: got.append(next(it))
    except StopIteration as e: result = e.value
    assert isinstance(result, Generation) and got == result.ids == generate(m, tok.encode("To be"), 10)[0].ids


def test_holdback():
    assert holdback("abc\ufffd") == "abc"
    assert holdback("yes\nUse", ["\nUser:"]) == "yes"
    assert holdback("yes\nUser:", ["\nUser:"]) == "yes\nUser:"  # a complete stop string is cut by the decoder, not here
    assert holdback("yes", ["\nUser:"]) == "yes"


def test_max_new_tokens(model):
    for n in (0, 1, 7):
        out = generate(model, PROMPTS, n)
        assert all(len(g.ids) == n and g.finish_reason == "length" for g in out)
    long = list(range(4, 60))  # context is 64
    out = generate(model, long, 100)[0]
    assert len(out.ids) == 64 - len(long) and out.finish_reason == "length"


@pytest.mark.parametrize("kw, msg", [
    (dict(temperature=-0.5), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(stop_strings=["x"]), "tokenizer")])
def test_bad_arguments(model, kw, msg):
    n = kw.pop("max_new_tokens", 4)
    with pytest.raises(ValueError, match=msg): generate(model, PROMPTS, n, **kw)


def test_bad_prompts(model):
    with pytest.raises(ValueError, match="no prompts"): generate(model, [], 4)
    with pytest.raises(ValueError, match="prompt 1 is empty"): generate(model, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="outside"): generate(model, [[1, 5000]], 4)
    with pytest.raises(ValueError, match="context"): generate(model, list(range(64)), 4)
    with pytest.raises(ValueError, match="temperature"): SamplingParams(temperature=-1)
