"""Invariants of microlm.inference: fast path == eager, speculative == plain greedy (both drafts), constrained decoding
on real models and against vLLM, the draft stage, bad input."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from microlm.generate import lively
from microlm.config import SMALL, SMOKE, Run
from microlm.generate import Decoding, chat_prompt, default_stop_ids, generate
from microlm.inference import (STEP_OPTIONS, CorpusLookup, DraftModel, FastLM, PromptLookup, answer_corpus,
                               corpus_lookup, draft_folder, draft_stage, linear, load_draft, lookup_continuation,
                               fast_model, ngram_table, speculative_benchmark, structured_prompts, time_decode)
from microlm.model import MicroLM, load_model
from microlm.serve import COMPACT_JSON_ARGS, VLLMServer
from microlm.vllm_offline import session_pids
from microlm.stages import ensure
from microlm.tasks import SCHEMAS, schema_errors, split_tasks
from microlm.tokenizer import load_tokenizer, to_hf, train_bpe
from microlm.train import read_log
from microlm.verify import bounded_schema

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21], [30, 31, 32, 33, 34]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: threads only add contention


def ids_of(gens): return [g.ids for g in gens]


@pytest.fixture(scope="module")
def model():
    return lively(MicroLM(replace(SMOKE.model, max_position_embeddings=96)))


@pytest.fixture(scope="module")
def draft():
    return lively(MicroLM(replace(SMOKE.model, max_position_embeddings=96, num_hidden_layers=1)), seed=5)


@pytest.fixture(scope="module")
def run(smoke_run):
    "The session's smoke run, with its draft model trained too (10 steps: a few seconds)."
    ensure(smoke_run, "draft", log=lambda line: None)
    return smoke_run


# --- the fast path -------------------------------------------------------------------------------------------------

def test_compiled_steps_are_kept_apart_by_architecture(model):
    "Each architecture's step keeps only tensor guards: models alike in every tensor but a constant must not share one."
    x = [list(range(3, 12))]
    twins = [lively(MicroLM(replace(SMOKE.model, max_position_embeddings=96, **kw))) for kw in
             (dict(), dict(rms_norm_eps=0.5), dict(tie_word_embeddings=False))]
    with torch.no_grad():
        twins[2].lm_head.weight.mul_(-1)  # untied: the head differs from the embedding, every shape the same
    for m, rows in [(twins[0], 8), (twins[1], 8), (twins[2], 8), (twins[0], 0)]:
        assert ids_of(generate(FastLM(m, written_rows=rows), x, 12)) == ids_of(generate(m, x, 12))
    assert len({FastLM(m).step for m in twins} | {FastLM(twins[0], written_rows=0).step}) == 4
    assert FastLM(twins[0]).step is FastLM(lively(MicroLM(twins[0].cfg), seed=9)).step  # same architecture: shared


@pytest.mark.parametrize("compile,rows", [(False, 8), (True, 8), (True, 0)], ids=["layout", "compiled", "blas"])
def test_fast_equals_eager(model, compile, rows):
    fast = FastLM(model, compile=compile, written_rows=rows)
    want = ids_of(generate(model, PROMPTS, 60))
    assert all(len(set(w)) > 10 for w in want)  # varied output: equality below means something
    assert ids_of(generate(fast, PROMPTS, 60)) == want  # batched, left padding
    assert [generate(fast, p, 60)[0].ids for p in PROMPTS] == want  # batch 1
    assert ids_of(generate(fast, PROMPTS, 20, use_cache=False)) == [w[:20] for w in want]
    x = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        assert torch.allclose(fast(x).logits, model(x).logits, atol=1e-4, rtol=1e-5)
    assert fast.compiled == compile  # the compiled step really ran: no silent fall-back to eager


def test_written_out_products_equal_blas():
    "`linear` compiled: dot products per weight row up to `rows` rows, BLAS above; both are x @ w.T to rounding."
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=g)
    compiled = torch.compile(linear, fullgraph=True, dynamic=False, options=STEP_OPTIONS)
    graphs = []

    def record(gm, inputs):  # the traced graph's calls, to see which way each product went
        graphs.append({getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes})
        return gm.forward

    for n in (1, 3, 5):
        x = torch.randn(n, 24, generator=g)
        got = compiled(x, w, 4)
        assert got.shape == (n, 40) and torch.allclose(got, x @ w.t(), atol=1e-5, rtol=1e-5)
        torch.compile(linear, backend=record, fullgraph=True, dynamic=False)(x, w, 4)
        assert ("linear" in graphs[-1]) == (n > 4) and ("sum" in graphs[-1]) == (n <= 4)
    assert torch.equal(linear(x, w, 8), torch.nn.functional.linear(x, w))  # not compiling: BLAS


def test_compiled_step_compiles_once_per_shape():
    "One program per batch size, padding and step size: a program per decoded token would recompile ~60 times."
    # an architecture no other test compiles (its own eps: its own compiled step), so every program counts here
    fresh = lively(MicroLM(replace(SMOKE.model, max_position_embeddings=96, rms_norm_eps=3e-6)))
    fast, before = FastLM(fresh), counters["stats"]["unique_graphs"]
    generate(fast, PROMPTS, 30)  # batched, left padding: every step feeds a slice of the growing text
    generate(fast, PROMPTS[0], 30)
    assert fast.compiled and 1 <= counters["stats"]["unique_graphs"] - before <= 4


def test_fast_equals_eager_small_architecture():
    m = lively(MicroLM(SMALL.model), std=0.05, seed=1)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, SMALL.model.vocab_size, (4, 16), generator=g).tolist()
    want = ids_of(generate(m, prompts, 48))
    assert len(set(want[0])) > 10
    assert ids_of(generate(FastLM(m), prompts, 48)) == want
    assert generate(FastLM(m), prompts[1], 48)[0].ids == want[1]


@pytest.mark.parametrize("compile", [False, True], ids=["layout", "compiled"])
def test_fast_equals_eager_qk_norm(compile):
    "QK-norm (Qwen3's block): the gains permuted with the paired rows; the same tokens batched and alone."
    m = lively(MicroLM(replace(SMOKE.model, max_position_embeddings=96, qk_norm=True)), seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in m.model.layers:
            for n in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                n.weight.copy_(torch.rand(n.weight.shape, generator=g) + 0.5)  # gains that are not all ones
    fast = FastLM(m, compile=compile)
    want = ids_of(generate(m, PROMPTS, 40))
    assert all(len(set(w)) > 8 for w in want)
    assert ids_of(generate(fast, PROMPTS, 40)) == want
    assert generate(fast, PROMPTS[1], 40)[0].ids == want[1]
    x = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        assert torch.allclose(fast(x).logits, m(x).logits, atol=1e-4, rtol=1e-5)
    assert fast.compiled == compile and fast.step is not FastLM(lively(MicroLM(SMOKE.model))).step


def test_fast_path_fills_the_context(model):
    fast, long = FastLM(model), list(range(4, 80))
    out = generate(fast, long, 100)[0]
    assert out.ids == generate(model, long, 100)[0].ids and len(out.ids) == 96 - len(long)


def test_fast_path_gives_each_row_its_budget(model, draft):
    "Past the context, the static cache drops its oldest columns (padding to every row still running): short rows go on."
    prompts = [list(range(4, 90)), [20, 21], list(range(100, 160))]  # 86, 2 and 60 of the context's 96
    alone = [generate(model, p, 40)[0].ids for p in prompts]
    assert [len(a) for a in alone] == [10, 40, 36]
    for fast in (FastLM(model), FastLM(model, compile=False)):
        assert ids_of(generate(fast, prompts, 40)) == alone
        for d in (PromptLookup(k=4), DraftModel(draft, k=3)):  # drafts stop at the shortest budget still running
            assert ids_of(generate(fast, prompts, 40, draft=d)) == alone


def test_fast_path_bad_input(model):
    with pytest.raises(ValueError, match="fp32"): FastLM(MicroLM(SMOKE.model).to(torch.bfloat16))
    relu2 = MicroLM(replace(SMOKE.model, hidden_act="relu2"))
    with pytest.raises(ValueError, match="SwiGLU, no soft-cap"): FastLM(relu2)
    assert fast_model(relu2) is relu2  # the fast path steps aside: decoded by MicroLM itself
    with pytest.raises(ValueError, match="context"): generate(FastLM(model), list(range(3, 100)), 4)
    with pytest.raises(ValueError, match="exceed"): FastLM(model)(torch.zeros(1, 97, dtype=torch.long))


# --- speculative decoding --------------------------------------------------------------------------------------------

def test_lookup_continuation():
    seq = np.array([7, 1, 2, 3, 9, 9, 4, 1, 2, 3])
    assert lookup_continuation(seq, 2).tolist() == [9, 9]
    assert lookup_continuation(seq, 8, ngram=1).tolist() == [9, 9, 4, 1, 2, 3]  # "3" alone: what followed it
    assert lookup_continuation(np.array([1, 2, 3]), 4).tolist() == []
    assert lookup_continuation(np.array([5]), 4).tolist() == []


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "fast"])
@pytest.mark.parametrize("kind", ["lookup", "draft", "self", "corpus"])
def test_speculative_equals_greedy(model, draft, fast, kind):
    target = FastLM(model) if fast else model
    own = ngram_table([g.ids for g in generate(model, [[3, 4, 5], [8, 9], [40, 41]], 30)], min_count=1)  # often right
    proposer = {"lookup": PromptLookup(k=5, ngram=2), "draft": DraftModel(FastLM(draft) if fast else draft, k=3),
                "self": DraftModel(model, k=4), "corpus": CorpusLookup(own, k=7)}[kind]
    want = ids_of(generate(model, PROMPTS, 40))
    run = Decoding(target, PROMPTS, 40, draft=proposer)
    for _ in run.steps(): pass
    assert ids_of(run.results) == want
    assert [generate(target, p, 40, draft=proposer)[0].ids for p in PROMPTS] == want
    if kind == "self":  # the target drafting for itself: every proposal is accepted, far fewer passes
        assert run.stats["accepted"] == run.stats["drafted"] > 0 and run.stats["forwards"] < 15


@pytest.mark.parametrize("ngram,min_ngram", [(3, 2), (3, 1), (1, 1), (4, 3)])
def test_prompt_lookup_index_equals_the_search(ngram, min_ngram):
    "The index that grows with the text proposes what `lookup_continuation` finds by searching the whole text."
    rng = np.random.default_rng(ngram * 10 + min_ngram)
    rows = rng.integers(0, 6, (2, 60))  # a small alphabet: many repeats
    pl = PromptLookup(k=4, ngram=ngram, min_ngram=min_ngram)
    pl.start(None, torch.from_numpy(rows[:, :5]), torch.tensor([[0, 0, 1, 1, 1], [1] * 5]), None)
    for T in range(5, 60, 3):  # the text grows by a few tokens per call, as when drafts are accepted
        got = pl.propose(torch.from_numpy(rows[:, :T]), None)
        want = [lookup_continuation(rows[0, 2:T], 4, ngram, min_ngram), lookup_continuation(rows[1, :T], 4, ngram, min_ngram)]
        if max(map(len, want)) == 0:
            assert got is None
        else:
            assert [g[: len(w)] for g, w in zip(got.tolist(), want)] == [w.tolist() for w in want]


def test_ngram_table_and_corpus_lookup():
    corpus = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [1, 2, 3, 4, 5], [7, 2, 3, 9]]
    table = ngram_table(corpus, n=2)
    assert table[(3, 4)] == 5 and table[(4,)] == 5  # 5 twice, 6 once
    assert table[(2, 3)] == 4 and table[(7, 2)] == -1  # "7 2" seen once: no sure guess
    assert ngram_table(corpus, n=2, min_share=0.7)[(3, 4)] == -1  # 2 of 3 is not 70%
    assert (5,) not in table and (1, 2, 3) not in table  # nothing follows the last token; contexts of n at most
    cl = CorpusLookup(table, k=5, n=2)
    assert cl.continuation([9, 1, 2]) == [3, 4, 5]  # nothing follows "4 5": the chain stops
    assert cl.continuation([7, 2]) == []  # the longest known context is unsure: no guess, no shorter one tried
    assert CorpusLookup(table, k=2, n=2).continuation([1, 2]) == [3, 4]
    for bad in (dict(k=0), dict(n=1, min_n=2), dict(min_n=0)):
        with pytest.raises(ValueError, match="CorpusLookup needs"): CorpusLookup(table, **bad)
    # batched proposals: the corpus where it knows two tokens or more, else prompt lookup, rows padded
    ids = torch.tensor([[0, 0, 9, 1, 2], [8, 6, 8, 6, 8]])
    cl.start(None, ids, torch.tensor([[0, 0, 1, 1, 1], [1] * 5]), None)
    assert cl.propose(ids, None).tolist() == [[3, 4, 5], [6, 8, 8]]  # row 2: copied "6 8" after the earlier "8 6 8"


def test_speculative_accepts_on_repeats():
    quiet = MicroLM(SMOKE.model).eval()  # default init: greedy falls into loops that lookup predicts
    loop = [11, 12, 13, 14] * 5
    run = Decoding(quiet, loop, 40, draft=PromptLookup(k=6))
    for _ in run.steps(): pass
    assert run.results[0].ids == generate(quiet, loop, 40)[0].ids
    assert run.stats["accepted"] > 10 and run.stats["forwards"] < 40


def test_speculative_with_penalty_stops_and_no_cache(model, draft):
    for kw in (dict(repetition_penalty=1.3), dict(stop_token_ids=[generate(model, PROMPTS[0], 20)[0].ids[9]]),
               dict(use_cache=False)):
        want = ids_of(generate(model, PROMPTS, 24, **kw))
        for d in (PromptLookup(k=4, ngram=1), DraftModel(draft, k=3)):
            assert ids_of(generate(model, PROMPTS, 24, draft=d, **kw)) == want, kw


def test_bad_drafts(model, draft):
    with pytest.raises(ValueError, match="vocabulary"):
        generate(model, PROMPTS, 4, draft=DraftModel(MicroLM(replace(SMOKE.model, vocab_size=512))))
    short = MicroLM(replace(SMOKE.model, max_position_embeddings=8))
    with pytest.raises(ValueError, match="draft model's context"): generate(model, PROMPTS, 4, draft=DraftModel(short))
    with pytest.raises(ValueError, match="context"): generate(model, list(range(3, 99)), 4, draft=PromptLookup())
    with pytest.raises(ValueError, match="greedily"): generate(model, PROMPTS, 4, draft=PromptLookup(), temperature=0.7)
    with pytest.raises(ValueError, match="k >= 1"): PromptLookup(k=0)
    with pytest.raises(ValueError, match="k >= 1"): DraftModel(draft, k=0)
    text = "To be, or not to be, that is the question. " * 5
    a, b = to_hf(train_bpe(text, vocab_size=300)), to_hf(train_bpe(text + "xyzzy plugh " * 9, vocab_size=300))
    m = lively(MicroLM(replace(SMOKE.model, vocab_size=len(a))))
    with pytest.raises(ValueError, match="tokenizer is not the target's"):
        generate(m, a.encode("To be"), 4, tokenizer=a, draft=DraftModel(m, tokenizer=b))
    assert generate(m, a.encode("To be"), 4, tokenizer=a, draft=DraftModel(m, tokenizer=a))[0].ids  # same: fine


# --- constrained decoding on the fast path and with drafts -----------------------------------------------------------

def test_constrained_fast_and_speculative(model):
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 5
    tok = to_hf(train_bpe(text + '{"answer": "yes", "count": 3}', vocab_size=300))
    m = lively(MicroLM(replace(SMOKE.model, vocab_size=len(tok))), seed=2)
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"type": "integer", "minimum": 0,
              "maximum": 99}, "who": {"type": "string", "pattern": "^[a-z ]{0,6}$"}}, "required": ["answer", "n", "who"],
              "additionalProperties": False}
    prompts = [tok.encode(t) for t in ("To be", "whether 'tis", "nobler in the mind to")]
    want = generate(m, prompts, 80, tokenizer=tok, schema=schema)
    assert all(schema_errors(json.loads(g.text), schema) == [] and g.finish_reason == "stop" for g in want)
    for target in (m, FastLM(m)):
        for d in (None, PromptLookup(k=4, ngram=2), DraftModel(m, k=3)):
            got = generate(target, prompts, 80, tokenizer=tok, schema=schema, draft=d)
            assert ids_of(got) == ids_of(want), (type(target).__name__, type(d).__name__)


# --- real models: the smoke run's SFT and draft ----------------------------------------------------------------------

def test_draft_stage(run):
    d = load_draft(run, k=3)
    assert d.model.cfg == run.preset.draft and (run / "draft" / "log.jsonl").exists()
    chat = draft_folder(run)  # fine-tuned on the SFT data, from the pretrained draft
    assert chat == run / "draft" / "chat" and len(read_log(chat / "log.jsonl")) > 0
    pre, tuned = load_model(run / "draft"), load_model(chat)
    loaded = load_draft(run, fast=False).model.state_dict()  # the proposer is the fine-tuned draft
    want = tuned.state_dict()
    assert loaded.keys() == want.keys() and all(torch.equal(loaded[k], v) for k, v in want.items())
    assert not torch.equal(pre.lm_head.weight, tuned.lm_head.weight)
    assert draft_folder(Run(run.root, replace(run.preset, draft_sft=replace(run.preset.draft_sft, max_steps=0)))) == \
        run / "draft"
    bad = Run(run.root, replace(run.preset, draft=replace(run.preset.draft, vocab_size=512)))
    with pytest.raises(ValueError, match="vocab_size"): draft_stage(bad, log=lambda line: None)


def test_speculative_on_the_sft_model(run):
    sft = load_model(run / "sft").eval()
    prompts, stops = structured_prompts(run, 3), default_stop_ids(load_tokenizer(run / "tokenizer"))
    want = [generate(sft, [p], 40, stop_token_ids=stops)[0].ids for p in prompts]
    for target in (sft, FastLM(sft)):
        for d in (PromptLookup(k=6), load_draft(run, k=4, fast=target is not sft), corpus_lookup(run)):
            assert [generate(target, [p], 40, stop_token_ids=stops, draft=d)[0].ids for p in prompts] == want
    r = time_decode(FastLM(sft), prompts[:1], 16, reps=1, draft=PromptLookup(), stop_token_ids=stops)
    assert r["ids"] == [want[0][:16]] and r["decode_tok_s"] > 0


def test_answer_corpus(run):
    tok = load_tokenizer(run / "tokenizer")
    corpus, eot = answer_corpus(run), tok.convert_tokens_to_ids("<|im_end|>")
    assert len(corpus) > 100 and all(seq[-1] == eot for seq in corpus)  # every answer with its end
    head = tok.encode("<|im_start|>assistant\n")[-4:]
    assert all(seq[:4] == head for seq in corpus[:20])  # after the generation prompt's last 4 tokens
    table = corpus_lookup(run).table
    assert table[tuple(head)] == tok.encode("{")[0]  # every answer is a JSON object: its first token is sure


def test_speculative_benchmark_rows(run):
    sft, tok = load_model(run / "sft").eval(), load_tokenizer(run / "tokenizer")
    rows = speculative_benchmark(sft, tok, structured_prompts(run, 2), None, corpus_lookup(run), new=12, reps=1,
                                 eager=False)
    assert [r["engine"] for r in rows] == ["fast", "fast + lookup", "fast + corpus"]
    assert all(r["same_as_fast"] for r in rows) and rows[0]["speedup_vs_fast"] == 1.0


def task_examples(run, n, room, kinds=tuple(SCHEMAS)):
    "Up to `n` train-play task prompts of each kind that leave `room` tokens for the answer (the smoke context is short)."
    tok, ctx = load_tokenizer(run / "tokenizer"), run.preset.model.max_position_embeddings
    by_kind = {k: [] for k in kinds}
    for e in split_tasks(run, "train")[0]:
        if e["kind"] in by_kind and len(by_kind[e["kind"]]) < n and len(chat_prompt(tok, e["messages"][:-1])) + room <= ctx:
            by_kind[e["kind"]].append(e)
    return [e for k in kinds for e in by_kind[k]]


def test_constrained_sft_model_always_valid(run):
    "Task schemas bounded to the budget, and hand-made ones: every answer of the smoke SFT model parses and validates."
    tok, sft = load_tokenizer(run / "tokenizer"), load_model(run / "sft").eval()
    ex = task_examples(run, 2, 50, kinds=("format", "to_json"))  # the kinds whose bounded answers fit the context
    assert {e["kind"] for e in ex} == {"format", "to_json"}
    scene = {"type": "object", "properties": {"speaker": {"type": "string", "pattern": "^[A-Z][a-z]{0,5}$"},
             "act": {"type": "integer", "minimum": 1, "maximum": 5}, "exits": {"type": "array", "items": {"enum":
             ["Hamlet", "Horatio"]}, "maxItems": 1}}, "required": ["speaker", "act", "exits"], "additionalProperties": False}
    verdict = {"enum": ["comedy", "tragedy", "history"]}
    schemas = [bounded_schema(e["schema"], 48) for e in ex] + [scene, verdict]
    prompts = [chat_prompt(tok, e["messages"][:-1]) for e in ex] + [chat_prompt(tok, ex[0]["messages"][:-1])] * 2
    for target in (sft, FastLM(sft)):
        out = generate(target, prompts, 50, tokenizer=tok, schema=schemas, stop_token_ids=default_stop_ids(tok))
        for g, s in zip(out, schemas):
            assert g.finish_reason == "stop" and schema_errors(json.loads(g.text), s) == [], (s, g.text)
    for g, e in zip(out, ex):
        assert schema_errors(json.loads(g.text), e["schema"]) == []  # valid for the task's own schema too


@pytest.fixture(scope="module")
def vllm_sft(run):
    "vLLM serving the smoke SFT model in fp32 with xgrammar and compact JSON (the deployment's options)."
    srv = VLLMServer(run / "hf" / "own_sft", extra_args=COMPACT_JSON_ARGS, startup_timeout=900)
    with srv: yield srv
    assert session_pids(srv.last_pid) == []


def test_constrained_tokens_equal_vllm(run, vllm_sft):
    "At temperature 0 in fp32 the own engine's constrained tokens are vLLM's response_format tokens."
    tok, sft = load_tokenizer(run / "tokenizer"), load_model(run / "sft").eval()
    stops, client = set(default_stop_ids(tok)), vllm_sft.client()
    cases = task_examples(run, 2, 32)  # every kind, two prompts each
    assert len(cases) == 2 * len(SCHEMAS)
    for e in cases:
        msgs = e["messages"][:-1]
        r = client.chat.completions.create(
            model=vllm_sft.served_name, messages=msgs, max_tokens=32, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": e["kind"], "schema": e["schema"]}},
            extra_body={"return_token_ids": True})
        got = [t for t in r.choices[0].token_ids if t not in stops]
        assert r.prompt_token_ids == chat_prompt(tok, msgs)  # the same prompt, token for token
        ours = generate(sft, [chat_prompt(tok, msgs)], 32, tokenizer=tok, schema=e["schema"], stop_token_ids=sorted(stops))[0]
        assert ours.ids == got, (e["kind"], ours.text, r.choices[0].message.content)
        fast = generate(FastLM(sft), [chat_prompt(tok, msgs)], 32, tokenizer=tok, schema=e["schema"],
                        stop_token_ids=sorted(stops), draft=PromptLookup())[0]
        assert fast.ids == got
