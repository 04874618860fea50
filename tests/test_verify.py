"microlm.verify against one real vLLM server on the tiny model: smoke, parity, benchmark, stability, and the checkers."
import json

import pytest

from microlm.config import Run
from microlm.serve import COMPACT_JSON_ARGS, VLLMServer
from microlm.vllm_offline import make_tiny_hf_model, session_pids
from microlm.tasks import SCHEMAS, schema_valid
from microlm.verify import (SMOKE_SCHEMA, _cut, _worst_len, _bounded, benchmark, bounded_schema, default_tasks, hf_reference,
                            longest_answer, parity_check, post_raw, random_prompts, smoke_checks, stability,
                            stability_rounds, verify_stage)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def server(tiny):
    srv = VLLMServer(tiny["model"], served_name="tiny", lora_modules={"ada": tiny["lora"]}, extra_args=COMPACT_JSON_ARGS,
                     startup_timeout=900)
    with srv: yield srv
    assert session_pids(srv.last_pid) == []


def test_schema_valid():
    ok = {"answer": "yes", "count": 3}
    assert schema_valid(ok, SMOKE_SCHEMA)
    for bad in ({"answer": "yes"}, {"answer": "y", "count": 3}, {"answer": "no", "count": 10}, {"answer": "no", "count": True},
                {"answer": "no", "count": 1, "extra": 0}, [ok], "yes"):
        assert not schema_valid(bad, SMOKE_SCHEMA), bad
    assert schema_valid([1, 2], {"type": "array", "items": {"type": "integer"}})
    assert not schema_valid([1, "a"], {"type": "array", "items": {"type": "integer"}})


def test_cut_and_random_prompts():
    assert _cut([5, 6, 2, 7], {2, 0}) == [5, 6] and _cut([5, 6], {2}) == [5, 6]
    assert random_prompts(2, 5, 100, seed=1) == random_prompts(2, 5, 100, seed=1) != random_prompts(2, 5, 100, seed=2)
    assert all(4 <= t < 100 for p in random_prompts(3, 50, 100) for t in p)


def test_bounded_schema_fits_every_budget():
    "The longest answer a bounded schema allows fits the budget and is valid under the original schema too."
    for kind, schema in SCHEMAS.items():
        smallest = _worst_len(_bounded(schema, 0, 0))
        assert bounded_schema(schema, smallest - 1) is None
        for budget in range(smallest, 260, 7):
            b = bounded_schema(schema, budget)
            assert b is not None and "_chars" not in json.dumps(b) and b["additionalProperties"] is False, (kind, budget)
            a = longest_answer(b)
            assert len(json.dumps(a, separators=(",", ":"))) <= budget, (kind, budget, a)
            assert schema_valid(a, b) and schema_valid(a, schema), (kind, budget, a)
    user = {"type": "object", "properties": {"name": {"type": "string", "minLength": 2, "maxLength": 5}}}
    b = bounded_schema(user, 60)                          # a schema's own length bound is kept, inside the pattern
    assert "maxLength" not in b["properties"]["name"] and longest_answer(b) == {"name": "WWWWW"}
    b = bounded_schema(SCHEMAS["to_json"], 200)
    assert schema_valid({"lines": [{"speaker": "KING", "text": "What news?"}]}, b)
    assert not schema_valid({"lines": [{"speaker": "KING", "text": 'say "hi"'}]}, b)  # quotes would need escapes: refused


def test_constrained_rounds_parse_with_tight_budgets(server):
    "Free-text fields under a budget of a few dozen tokens: unbounded, a grammar-following model runs out of tokens mid-string."
    t = {"messages": [{"role": "user", "content": "Convert to JSON: KING. What news?"}], "schema": SCHEMAS["to_json"],
         "gold": {"lines": [{"speaker": "KING", "text": "What news?"}]}, "max_tokens": 30}
    rounds = stability_rounds(server, [t] * 6, rounds=1, temperature=1.0)
    con = [r for r in rounds if r["mode"] == "constrained"][0]
    assert con["parse_rate"] == 1.0 and con["schema_rate"] == 1.0 and con["skipped"] == 0, rounds
    too_small = dict(t, max_tokens=5)
    with pytest.raises(ValueError, match="none of the 1 tasks"): stability_rounds(server, [too_small], rounds=1)


def test_verify_stage_needs_export(tmp_path):
    with pytest.raises(FileNotFoundError, match="export stage"): verify_stage(Run(tmp_path, "smoke"))


def test_smoke(server, tmp_path):
    res = smoke_checks(server, tmp_path)
    failed = [c for c in res["checks"] if not c["ok"]]
    assert res["passed"] == res["total"] and not failed, failed
    names = {c["name"] for c in res["checks"]}
    assert {"models", "streaming", "json_schema", "lora_differs", "unknown_model_404", "bad_schema_400", "healthy_after_errors"} <= names
    saved = json.loads((tmp_path/"smoke.json").read_text())
    assert saved["passed"] == res["passed"] and isinstance(saved["checks"][0]["ok"], bool)


def test_smoke_can_fail(server):
    "Comparing the base with itself as the 'adapter' must fail the LoRA check."
    res = smoke_checks(server, lora="tiny")
    assert {c["name"]: c["ok"] for c in res["checks"]}["lora_differs"] is False and res["passed"] == res["total"] - 1


def test_raw_bad_requests(server):
    assert post_raw(server, "/v1/completions", b"not json")[0] == 400
    assert post_raw(server, "/v1/chat/completions", {"model": "tiny", "messages": "not a list"})[0] == 400
    assert server.health()


def test_parity_with_transformers(server, tiny):
    ref = hf_reference(tiny["model"])
    res = parity_check(server, ref, ["Once upon a time", [7, 8, 9, 10, 11, 12]], max_tokens=12)
    assert res["all_equal"], res["cases"]
    assert all(len(c["vllm"]) > 0 for c in res["cases"])
    wrong = parity_check(server, lambda ids, n: [t + 1 for t in ref(ids, n)], [[7, 8, 9]], max_tokens=6)
    assert not wrong["all_equal"] and wrong["cases"][0]["first_diff"] == 0


def test_openai_backend_scores_the_server_as_transformers_does(server, tiny):
    "17_evaluate's suite through the served model's OpenAI API: `transformers`' answers on the same folder, so its scores."
    from microlm.evaluate import evaluate_structured, hf_backend, openai_backend
    examples = [
        dict(id=str(i), kind="format", schema=SCHEMAS["format"], gold={"speaker": w.upper(), "first_word": w, "line_count": 1},
             messages=[{"role": "user", "content": f"Who speaks of {w}? Answer in JSON."}, {"role": "assistant", "content": ""}])
        for i, w in enumerate(["crown", "ghost", "denmark", "poison"])
    ]
    served = evaluate_structured(openai_backend(server.base_url, "tiny", max_new_tokens=12), examples, "served")
    local = evaluate_structured(hf_backend(tiny["model"], max_new_tokens=12), examples, "local")
    answers = [r["answer"] for r in served["records"]]
    assert answers == [r["answer"] for r in local["records"]] and all(answers), answers  # greedy fp32: the same text
    assert served["overall"] == local["overall"]


def test_hf_reference_ignore_eos(tiny, tmp_path):
    "The benchmark's baseline decodes the whole length; the parity reference stops at the first end-of-sequence id."
    import shutil
    p = [7, 8, 9, 10]
    first = hf_reference(tiny["model"], ignore_eos=True)(p, 12)
    assert len(first) == 12
    eos, d = first[3], tmp_path / "eos"  # the same model, with a token of its greedy answer made its end-of-sequence
    shutil.copytree(tiny["model"], d)
    for f in ("config.json", "generation_config.json"):
        c = json.loads((d / f).read_text())
        (d / f).write_text(json.dumps({**c, "eos_token_id": eos}))  # an int here; the tiny model's own ids are a list
    cut, full = hf_reference(d)(p, 12), hf_reference(d, ignore_eos=True)(p, 12)
    assert cut == first[:first.index(eos)] and full == first  # cut at the new end-of-sequence id; not cut at all


def test_benchmark(server, tiny, tmp_path):
    calls = []
    def baseline(ids, n): calls.append(len(ids)); return list(range(n))
    res = benchmark(server, tmp_path, concurrency=(1, 4), shapes=((8, 4),), requests=4, baseline=baseline, baseline_requests=2)
    assert res["errors"] == 0 and [l["concurrency"] for l in res["levels"]] == [1, 4]
    for l in res["levels"]:
        assert l["output_tokens"] == 4 * 4 and l["output_tok_s"] > 0 and 0 < l["ttft_p50"] <= l["latency_p95"]
    assert calls == [8, 8, 8] and res["baseline"][0]["requests"] == 2   # one untimed warm-up call, then the two timed ones
    for wrong, got in ((lambda ids, n: [5], 1), (lambda ids, n: [5] * (n + 1), 5)):  # too short or too long: other work
        with pytest.raises(ValueError, match=f"returned {got} of the 4 tokens"):
            benchmark(server, None, concurrency=(1,), shapes=((8, 4),), requests=1, baseline=wrong, baseline_requests=1)
    assert res["baseline"][0]["output_tok_s"] > 0
    assert res["scaling"] == {"8→4": {"c4/c1": round(res["levels"][1]["output_tok_s"] / res["levels"][0]["output_tok_s"], 2)}}
    assert json.loads((tmp_path/"bench.json").read_text())["levels"][0]["requests"] == 4 and (tmp_path/"bench.png").exists()


def test_stability(server, tmp_path):
    res = stability(server, tmp_path, tasks=default_tasks(), rounds=1, soak_requests=120, concurrency=16, max_tokens=8)
    assert res["server_errors"] == 0 and res["healthy_after"] and res["constrained_parse_rate"] == 1.0
    assert res["requests"] == 120 + 2 * len(default_tasks())
    sk = res["soak"]
    assert sk["done"] == 120 and sk["disconnects"] > 0 and sk["client_errors"] == 0 and sk["rss_max_gib"] > 0.1
    saved = json.loads((tmp_path/"stability.json").read_text())
    assert saved["server_errors"] == 0 and (tmp_path/"stability.png").exists()
    assert server.health()


def test_vllm_bench_serve_cross_check(server):
    from microlm.verify import vllm_bench_serve
    r = vllm_bench_serve(server, input_len=8, output_len=4, num_prompts=8, concurrency=4)
    assert r["ok"], r.get("reason")
    assert r["completed"] == 8 and r["total_output_tokens"] == 8 * 4 and r["output_throughput"] > 0
