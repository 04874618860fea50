"Invariants of microlm.generate: KV cache == no cache, batched == one by one, == transformers, seeds, stops, bad input."
import re
from dataclasses import replace

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

from microlm.generate import lively
from microlm.config import SMOKE
from microlm.generate import (Generation, HFCausalLM, SamplingParams, apply_repetition_penalty, apply_top_k, apply_top_p,
                              generate, generate_text, holdback, left_pad, stream_ids, stream_text)
from microlm.model import MicroLM, hf_model
from microlm.tokenizer import to_hf, train_bpe

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21], [30, 31, 32, 33, 34]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: threads only add contention


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
    hf = hf_model(model.cfg).eval()
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


LONG_AND_SHORT = [list(range(4, 60)), [20, 21], list(range(100, 130)), [7, 8, 9]]  # 56, 2, 30, 3 tokens; context 64


def test_each_row_has_its_own_budget(model):
    "Beside a prompt that nearly fills the context, a short one still gets all its max_new_tokens, as alone (and vLLM)."
    alone = [generate(model, p, 40)[0] for p in LONG_AND_SHORT]
    assert [len(g.ids) for g in alone] == [8, 40, 34, 40]  # the context leaves 8 and 34 to the long ones
    hf = HFCausalLM(hf_twin(model))
    for m, kw in [(model, {}), (model, dict(use_cache=False)), (hf, {}), (hf, dict(use_cache=False))]:
        out = generate(m, LONG_AND_SHORT, 40, **kw)
        assert ids_of(out) == ids_of(alone), (type(m).__name__, kw)
        assert all(g.finish_reason == "length" for g in out)
    w = Widths(model)  # the long rows leave the batch when their budgets run out: 4 rows, then 2
    generate(w, LONG_AND_SHORT, 40)
    assert w.widths[0] == 4 and w.widths[-1] == 2


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


# --- constrained decoding (xgrammar) ---------------------------------------------------------------------------------

import json  # noqa: E402

from microlm.generate import Constraint, default_stop_ids  # noqa: E402
from microlm.tasks import SCHEMAS, schema_errors  # noqa: E402
from microlm.verify import bounded_schema  # noqa: E402


@pytest.fixture(scope="module")
def tok_model(tok):
    return lively(MicroLM(replace(SMOKE.model, vocab_size=len(tok))), seed=2)


def test_constrained_random_model_always_valid(tok, tok_model):
    "Every task schema (bounded to the token budget) and a hand-made one: every answer parses and validates."
    schemas = [bounded_schema(s, 70) for s in SCHEMAS.values()] + [
        {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": -5, "maximum": 5},
         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}, "required": ["ok", "n", "tags"],
         "additionalProperties": False}]
    prompts = [tok.encode(t) for t in ("To be", "whether 'tis nobler", "héllo wörld", "the question")]
    for s in schemas:
        for kw in (dict(), dict(temperature=1.0, seed=3)):
            for g in generate(tok_model, prompts, 80, tokenizer=tok, schema=s, **kw):
                assert g.finish_reason == "stop" and schema_errors(json.loads(g.text), s) == [], (s, g.text)


def test_constrained_rows_have_their_own_grammars(tok, tok_model):
    prompts = [tok.encode(t) for t in ("To be", "whether", "héllo")]
    out = generate(tok_model, prompts, 30, tokenizer=tok, choices=[["yes", "no"], ["Hamlet", "Ophelia"], None])
    assert out[0].text in ("yes", "no") and out[1].text in ("Hamlet", "Ophelia")
    assert out[2].text == generate(tok_model, prompts[2], 30, tokenizer=tok, stop_token_ids=default_stop_ids(tok))[0].text
    batched = generate(tok_model, prompts, 30, tokenizer=tok, regex=r"[0-9]{3}-[a-z]{2,4}")
    assert all(re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", g.text) for g in batched)
    assert [g.ids for g in batched] == [generate(tok_model, p, 30, tokenizer=tok, regex=r"[0-9]{3}-[a-z]{2,4}")[0].ids
                                        for p in prompts]  # a batch answers each prompt as alone
    quoted = generate(tok_model, prompts, 30, tokenizer=tok, choices=['say "hi"', "a\\b", "two\nlines"])
    assert all(g.text in ('say "hi"', "a\\b", "two\nlines") for g in quoted)


PHRASES = ("To be", "whether 'tis nobler", "héllo wörld", "the question")


def test_close_within_closes_unbounded_schemas(tok, tok_model):
    "The task schemas as they are (no bound on any string): with the last tokens steered, every answer is valid."
    prompts = [tok.encode(t) for t in PHRASES]
    for s in SCHEMAS.values():
        for kw in (dict(), dict(temperature=1.0, seed=3)):
            # 300 tokens, nearly one per character: the shortest way out of `extract` can take 55
            for g in generate(tok_model, prompts, 96, tokenizer=tok, schema=s, close_within=64, **kw):
                assert g.finish_reason == "stop" and schema_errors(json.loads(g.text), s) == [], (s, g.text)


def test_close_within_leaves_answers_that_end_in_time(tok, tok_model):
    "Rows that end before their last `close_within` tokens decode exactly as without it; steered rows stay valid."
    s, prompts = bounded_schema(SCHEMAS["format"], 70), [tok.encode(t) for t in PHRASES]
    plain = generate(tok_model, prompts, 80, tokenizer=tok, schema=s)
    assert all(g.finish_reason == "stop" for g in plain)
    n = max(len(g.ids) for g in plain) + 1  # the longest answer and its stop token
    assert [g.ids for g in generate(tok_model, prompts, n + 8, tokenizer=tok, schema=s, close_within=8)] == [
        g.ids for g in plain]
    steered = generate(tok_model, prompts, n, tokenizer=tok, schema=s, close_within=n - 4)  # steered almost at once
    assert [g.ids for g in steered] != [g.ids for g in plain]
    assert all(schema_errors(json.loads(g.text), s) == [] for g in steered)


def test_close_within_counts_each_rows_own_budget(tok, tok_model):
    "A long prompt's row is steered to close within its own few tokens; the short rows beside it decode as alone."
    s, ctx = SCHEMAS["extract"], tok_model.cfg.max_position_embeddings
    long = tok.encode(" ".join(PHRASES) * 20)[: ctx - 72]  # leaves 72 tokens: steered after 8 (extract may need 55)
    prompts = [tok.encode(PHRASES[0]), long, tok.encode(PHRASES[2])]
    batched = generate(tok_model, prompts, 96, tokenizer=tok, schema=s, close_within=64)
    alone = [generate(tok_model, [p], 96, tokenizer=tok, schema=s, close_within=64)[0] for p in prompts]
    assert ids_of(batched) == ids_of(alone)
    assert all(g.finish_reason == "stop" and schema_errors(json.loads(g.text), s) == [] for g in batched)


class StopHappy(torch.nn.Module):
    "A model that always wants to stop: its stop token's logit is raised far above the rest."

    def __init__(self, m, stop):
        super().__init__()
        self.m, self.cfg, self.stop = m, m.cfg, stop

    def new_cache(self, *a): return self.m.new_cache(*a)

    def forward(self, ids, **kw):
        out = self.m(ids, **kw)
        out.logits[..., self.stop] += 100.0
        return out


def test_stop_token_only_when_complete(tok, tok_model):
    stop = default_stop_ids(tok)
    eager = StopHappy(tok_model, stop)
    assert generate(eager, tok.encode("To be"), 20, stop_token_ids=stop)[0].ids == []  # free: stops at once
    s = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}, "b": {"type": "integer", "minimum": 0, "maximum": 9}},
         "required": ["a", "b"], "additionalProperties": False}
    g = generate(eager, tok.encode("To be"), 40, tokenizer=tok, schema=s)[0]
    assert g.finish_reason == "stop" and schema_errors(json.loads(g.text), s) == []  # the stop waits for the '}'


def test_constrained_bad_input(tok, tok_model):
    p = tok.encode("To be")
    bad = [(dict(schema={"type": "no-such-type"}), "not a valid JSON schema"), (dict(schema="{not json"), "not valid JSON"),
           (dict(schema=[1, 2]), "one per prompt"), (dict(regex="(unclosed"), "xgrammar cannot compile"),
           (dict(choices=[]), "non-empty"), (dict(schema={"type": "string"}, regex="a"), "one of schema, regex or choices"),
           (dict(schema=["not a schema"]), "prompt 0"), (dict(schema={"type": "string"}, close_within=-1), "close_within")]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg): generate(tok_model, [p], 8, tokenizer=tok, **kw)
    with pytest.raises(ValueError, match="tokenizer"): generate(tok_model, [p], 8, schema={"type": "string"})
    with pytest.raises(ValueError, match="stop token"): Constraint(tok, len(tok), [("regex", "a")], [])


# --- the draft hook --------------------------------------------------------------------------------------------------

from microlm.generate import Decoding, accepted_drafts  # noqa: E402


class Replay:
    "A proposer that knows (part of) the answer; `noise` replaces every other guess with a wrong token."

    def __init__(self, answer, k=3, noise=False):
        self.answer, self.k, self.noise = torch.tensor(answer), k, noise

    def start(self, model, ids, mask, tokenizer): self.T = ids.size(1)

    def propose(self, ids, mask):
        d = self.answer[:, ids.size(1) - self.T:][:, :self.k].clone()
        if self.noise: d[:, 1::2] = (d[:, 1::2] + 1) % 1000
        return d


def test_accepted_drafts():
    picks, drafts = torch.tensor([[1, 2, 3, 9], [1, 5, 3, 4]]), torch.tensor([[1, 2, 3], [1, 2, 3]])
    assert accepted_drafts(picks, drafts) == 1  # rows advance together: the second agrees on one
    assert accepted_drafts(picks, drafts, done=[False, True]) == 3  # a finished row holds nobody back
    assert accepted_drafts(picks, drafts, done=[True, True]) == 0


@pytest.mark.parametrize("noise", [False, True])
def test_draft_hook_is_lossless(model, noise):
    want = ids_of(generate(model, PROMPTS, 20))
    hf = HFCausalLM(hf_twin(model))  # a transformers cache is cropped, a KVCache rewound
    for m in (model, hf):
        run = Decoding(m, PROMPTS, 20, draft=Replay(want, noise=noise))
        for _ in run.steps(): pass
        assert ids_of(run.results) == want
        assert (run.stats["accepted"] == run.stats["drafted"]) != noise and run.stats["forwards"] < 20


def test_drafts_stop_at_each_rows_budget(model):
    "Drafts never take a row past its own budget: the long prompt's 8 tokens end the drafting, not the batch."
    want = ids_of(generate(model, LONG_AND_SHORT, 40))
    padded = [w + [0] * (40 - len(w)) for w in want]
    for m in (model, HFCausalLM(hf_twin(model))):
        run = Decoding(m, LONG_AND_SHORT, 40, draft=Replay(padded, k=5))
        for _ in run.steps(): pass
        assert ids_of(run.results) == want and run.stats["accepted"] == run.stats["drafted"] > 0


def test_special_id_agrees_with_the_vocabulary(tok):
    from transformers import PreTrainedTokenizerFast
    from microlm.generate import special_id
    with_unk = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, unk_token="<|endoftext|>")  # as SmolLM2's
    assert with_unk.convert_tokens_to_ids("<|missing|>") == with_unk.unk_token_id  # the case special_id must see through
    for t in (tok, with_unk):
        for s in ("<|im_end|>", "<|im_start|>", "<|endoftext|>", "<|pad|>", "<|missing|>", "the"):
            assert special_id(t, s) == t.get_vocab().get(s), s


def test_end_of_turn_id(tok):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from microlm.generate import end_of_turn_id
    assert end_of_turn_id(tok) == tok.get_vocab()["<|im_end|>"]  # ChatML's end of turn
    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<eos>": 1})), eos_token="<eos>")
    assert end_of_turn_id(plain) == 1  # no <|im_end|>: the turn ends with EOS


def test_shrink_to():
    from microlm.generate import shrink_to
    done = [True, False, True, True, False, True, True, True]
    assert shrink_to(list(range(8)), done).tolist() == [1, 4]               # 2 running: a batch of 2
    assert shrink_to([0, 1, 2, 4], done).tolist() == [1, 3]                 # indices into the current rows
    assert shrink_to([1, 4], done) is None                                  # already as small as it gets
    assert shrink_to(list(range(8)), [False] * 5 + [True] * 3) is None       # 5 running: still 8
    assert shrink_to(list(range(6)), [False] * 3 + [True] * 3).tolist() == [0, 1, 2, 3]  # 4: a finished row rides along
    assert shrink_to(list(range(3)), [True] * 3) is None                    # all finished: the loop ends


class Widths(torch.nn.Module):
    "A model wrapper that records the batch size of every forward pass."
    def __init__(self, m):
        super().__init__(); self.m, self.cfg, self.widths = m, m.cfg, []
    def new_cache(self, *a, **kw): return self.m.new_cache(*a, **kw)
    def forward(self, ids, **kw):
        self.widths.append(ids.size(0)); return self.m(ids, **kw)


def test_finished_rows_leave_the_batch(model):
    "Rows that stop leave the batch (8 -> 4 -> 2 -> 1 rows), and every row's tokens stay what it gets alone."
    prompts = [PROMPTS[i % 3][: 2 + i] for i in range(8)]
    free = generate(model, prompts, 24)
    stops = [g.ids[2 + 3 * (i % 5)] for i, g in enumerate(free)]          # each row its own stop, at another step
    w = Widths(model)
    run = Decoding(w, prompts, 24)
    run.stop_ids = set(stops)
    for _ in run.steps(): pass
    alone = [generate(model, p, 24, stop_token_ids=stops)[0] for p in prompts]
    assert ids_of(run.results) == ids_of(alone) and [g.finish_reason for g in run.results] == [g.finish_reason for g in alone]
    assert w.widths[0] == 8 and w.widths[-1] < 8 and w.widths == sorted(w.widths, reverse=True)
    assert set(w.widths) <= {8, 4, 2, 1}
    sampled = generate(model, prompts, 24, stop_token_ids=stops, temperature=1.0, top_k=1, seed=4)  # the sampling path
    assert ids_of(sampled) == ids_of(alone)  # top-1 sampling is greedy: rows leaving the batch change no row


def test_constrained_rows_leave_the_batch_with_their_grammars(tok, tok_model):
    "Short answers finish first and leave; the grammars of the rows that stay move with them."
    prompts = [tok.encode(t) for t in PHRASES]
    regexes = ["a|b", r"[a-z]{12,20}", "yes|no", r"[0-9]{10,14}"]
    w = Widths(tok_model)
    mixed = generate(w, prompts, 30, tokenizer=tok, regex=regexes)
    alone = [generate(tok_model, [p], 30, tokenizer=tok, regex=r)[0].text for p, r in zip(prompts, regexes)]
    assert [g.text for g in mixed] == alone and min(w.widths) < 4
    assert all(re.fullmatch(r, g.text) for r, g in zip(regexes, mixed))
