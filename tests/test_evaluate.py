"Invariants of microlm.evaluate: scoring and aggregation, judgement, result files, bad backend output, LM metrics, backend agreement."
import csv, json, math, threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
import torch

from microlm.config import SMOKE
from microlm.evaluate import (LEADERBOARD, evaluate_structured, hf_backend, judgement, lm_metrics, openai_backend,
                              own_backend, write_results)
from microlm.tasks import KINDS, METRICS, SCHEMAS, aggregate, flatten, parse_json, score_answer

GOLD = {"speaker": "HAMLET", "first_word": "To", "line_count": 3}
LINES = {"lines": [{"speaker": "A", "text": "x"}, {"speaker": "B", "text": "y"}]}


def ex(i, gold=GOLD, kind="format"):
    return dict(id=f"e{i}", kind=kind, schema=SCHEMAS[kind], gold=gold,
                messages=[{"role": "user", "content": f"prompt {i}"}, {"role": "assistant", "content": json.dumps(gold)}])


def test_exact_answer_scores_perfectly():
    for gold, kind in ((GOLD, "format"), (LINES, "to_json")):
        s = score_answer(json.dumps(gold, indent=2), gold, SCHEMAS[kind])
        assert s["parsed"] and s["json_only"] and s["schema_valid"] and s["exact"]
        assert s["tp"] == s["n_pred"] == s["n_gold"] and s["missing"] == s["hallucinated"] == 0
        assert aggregate([s])["f1"] == 1.0


def test_key_order_does_not_matter_and_types_do():
    assert score_answer('{"line_count":3,"first_word":"To","speaker":"HAMLET"}', GOLD, SCHEMAS["format"])["exact"]
    s = score_answer('{"speaker":"HAMLET","first_word":"To","line_count":"3"}', GOLD, SCHEMAS["format"])
    assert not s["exact"] and not s["schema_valid"] and s["tp"] == 2


def test_partial_and_unparsed():
    s = score_answer('{"lines":[{"speaker":"A","text":"x"},{"speaker":"C","text":"y"}],"extra":1}', LINES, SCHEMAS["to_json"])
    assert (s["tp"], s["n_pred"], s["n_gold"], s["hallucinated"], s["missing"]) == (3, 5, 4, 1, 0)
    for bad in ("", "not json", "{broken", None, 42):
        u = score_answer(bad, GOLD, SCHEMAS["format"])
        assert not u["parsed"] and u["tp"] == 0 and u["missing"] == 3 and not u["exact"]
    assert parse_json('Here you are: {"a": 1} hope it helps') == ({"a": 1}, False)
    assert parse_json('{"a": ') == (None, False) and parse_json('```json\n[1]\n```') == ([1], True)
    assert flatten({"a": [], "b": {}}) == {("a", "[]"), ("b", "{}")}


def test_aggregate_is_micro_averaged_and_bounded():
    scores = [score_answer(json.dumps(GOLD), GOLD, SCHEMAS["format"]),                      # 3/3
              score_answer('{"speaker":"X","first_word":"To"}', GOLD, SCHEMAS["format"]),   # 1/2 pred, 1/3 gold
              score_answer("nope", GOLD, SCHEMAS["format"])]                                # 0/0, 0/3
    a = aggregate(scores)
    assert a["n"] == 3 and a["parse"] == pytest.approx(2 / 3) and a["exact"] == pytest.approx(1 / 3)
    assert a["precision"] == pytest.approx(4 / 5) and a["recall"] == pytest.approx(4 / 9)
    assert a["f1"] == pytest.approx(2 * (4 / 5) * (4 / 9) / (4 / 5 + 4 / 9))
    assert all(0 <= a[k] <= 1 for k in (*METRICS, "precision", "recall", "json_only"))
    assert aggregate([])["n"] == 0


def _result(name, answers, examples):
    return evaluate_structured(lambda convs: answers[:len(convs)], examples, name)


def test_judgement_names_the_best_model():
    exs = [ex(i) for i in range(4)]
    good, bad = json.dumps(GOLD), '{"speaker":"HAMLET"}'
    res = [_result("smol_base", ["no"] * 4, exs), _result("smol_lora", [good] * 3 + [bad], exs),
           _result("own_sft", [bad] * 4, exs), _result("own_lora", [good] + [bad] * 3, exs)]
    board = {r["model"]: r["overall"] for r in res}
    text = judgement(board)
    assert text.startswith("Deploy **smol_lora**") and "own_lora" in text
    assert "+" in text.split("moved SmolLM2 by")[1][:3]                     # LoRA improved SmolLM2
    board2 = {**board, "own_sft": {**board["smol_lora"], "f1": 1.0, "exact": 1.0}}
    assert judgement(board2).startswith("Deploy **own_sft**") and "the pick" in judgement(board2)


def test_write_results_files(tmp_path):
    exs = [ex(0), ex(1, LINES, "to_json")]
    res = [_result(m, [json.dumps(GOLD), "x"], exs) for m in LEADERBOARD]
    lb = write_results(res, tmp_path, lm={"own_sft": {"test": {"bpb": 2.0}}})
    names = {p.name for p in tmp_path.iterdir()}
    assert {"leaderboard.json", "judgement.md", "scores.csv", "metrics.png", "per_kind.png"} <= names
    assert {f"{m}.json" for m in LEADERBOARD} <= names
    disk = json.loads((tmp_path/"leaderboard.json").read_text())
    assert disk["smol_lora"]["n"] == 2 and disk["smol_lora"]["per_kind"]["to_json"]["n"] == 1
    assert disk["own_sft"]["lm"]["test"]["bpb"] == 2.0 and disk["judgement"] == lb["judgement"]
    assert lb["judgement"] in (tmp_path/"judgement.md").read_text()
    rows = list(csv.DictReader(open(tmp_path/"scores.csv")))
    assert len(rows) == len(LEADERBOARD) * (len(KINDS) + 1)
    assert {r["kind"] for r in rows} == {"all", *KINDS}
    per = json.loads((tmp_path/"own_sft.json").read_text())
    assert len(per["records"]) == 2 and per["records"][1]["answer"] == "x"


def test_bad_backend_output():
    exs = [ex(i) for i in range(3)]
    with pytest.raises(ValueError, match="returned 2 answers for 3 prompts"):
        evaluate_structured(lambda c: ["{}", "{}"], exs, "short")
    r = evaluate_structured(lambda c: [None, 7, json.dumps(GOLD)], exs, "odd")
    assert [x["parsed"] for x in r["records"]] == [False, False, True] and r["records"][0]["answer"] == ""
    with pytest.raises(ValueError, match="no results"): write_results([], "/tmp/unused-never-written")


class _Stub(BaseHTTPRequestHandler):
    mode = "500"
    def do_POST(self):
        n = int(self.headers.get("Content-Length", 0)); self.rfile.read(n)
        if self.mode == "500":
            body, code = b'{"error": {"message": "boom"}}', 500
        else:                                                   # a valid response whose content is null
            body, code = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                     "choices": [{"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant", "content": None}}]}).encode(), 200
        self.send_response(code); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass


@pytest.mark.parametrize("mode", ["500", "null"])
def test_openai_backend_error_path(mode):
    handler = type("H", (_Stub,), {"mode": mode})
    srv = HTTPServer(("127.0.0.1", 0), handler); threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        be = openai_backend(f"http://127.0.0.1:{srv.server_address[1]}/v1", "m", timeout=10)
        convs = [[{"role": "user", "content": "hi"}]] * 2
        if mode == "500":
            with pytest.raises(RuntimeError, match="failed"): be(convs)
        else:
            r = evaluate_structured(be, [ex(0), ex(1)], "null")
            assert r["overall"]["parse"] == 0 and [x["answer"] for x in r["records"]] == ["", ""]
    finally:
        srv.shutdown()


def test_lm_metrics_matches_cross_entropy():
    torch.manual_seed(0)
    from microlm.model import MicroLM
    m = MicroLM(replace(SMOKE.model, vocab_size=64)).eval()
    toks = np.random.default_rng(0).integers(0, 64, 1000).astype(np.uint16)
    r = lm_metrics(m, toks, bytes_per_token=2.0, seq_len=32, n_windows=5)
    starts = np.linspace(0, len(toks) - 32, 5).astype(int)
    with torch.no_grad():
        ce = [torch.nn.functional.cross_entropy(m(x[None]).logits[0, :-1], x[1:]).item()
              for x in (torch.from_numpy(toks[s:s + 32].astype(np.int64)) for s in starts)]
    assert r["windows"] == 5 and r["loss"] == pytest.approx(np.mean(ce), abs=1e-4)
    assert r["bpb"] == pytest.approx(r["loss"] / math.log(2) / 2.0, abs=1e-3) and r["ppl"] == pytest.approx(math.exp(r["loss"]), rel=1e-3)
    assert abs(r["loss"] - math.log(64)) < 0.5                             # an untrained model is near uniform
    with pytest.raises(ValueError, match="less than one window"): lm_metrics(m, toks[:10], 2.0, 32)


def test_own_and_hf_backends_agree(tmp_path):
    from microlm.export import export_hf
    from microlm.model import MicroLM
    from microlm.tokenizer import save_tokenizer, to_hf, train_bpe
    text = "ROMEO. But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. " * 50
    with pytest.warns(UserWarning): tok_dir = save_tokenizer(to_hf(train_bpe(text, 400)), tmp_path/"tok")
    torch.manual_seed(0)
    m = MicroLM(replace(SMOKE.model, vocab_size=400)).eval()
    folder = export_hf(m, tok_dir, tmp_path/"own")
    convs = [[{"role": "user", "content": "Who speaks?" * k}] for k in (1, 3, 2)]   # different lengths: padding and re-ordering
    a = own_backend(m, tok_dir, max_new_tokens=12, batch_size=2)(convs)
    b = hf_backend(folder, max_new_tokens=12, batch_size=2)(convs)
    assert a == b and len(a) == 3
    assert own_backend(m, tok_dir, max_new_tokens=12, batch_size=3)(convs) == a          # batching does not change answers
    from microlm.export import hf_to_own                   # a Hugging Face folder in the own engine, as SmolLM2 is evaluated
    from transformers import AutoTokenizer
    assert own_backend(hf_to_own(folder), AutoTokenizer.from_pretrained(folder), max_new_tokens=12, batch_size=2)(convs) == a


def test_judgement_when_nothing_parses():
    exs = [ex(i) for i in range(2)]
    board = {m: _result(m, ["no", "no"], exs)["overall"] for m in ("smol_base", "own_sft")}
    assert judgement(board).startswith("No model is fit to deploy")
    assert "on the 2 held-out prompts" in judgement(board)
    one = {m: _result(m, ["no"], exs[:1])["overall"] for m in ("smol_base", "own_sft")}
    assert "on the 1 held-out prompt (" in judgement(one)                  # the count's noun agrees with it


def test_judgement_recommends_no_model_that_scores_nothing():
    # the smoke leaderboard's case: answers that parse, with not one field right, must not be "deployed"
    exs = [ex(i) for i in range(4)]
    wrong = '{"speaker":"X","first_word":"Y","line_count":9}'
    board = {"smol_base": _result("smol_base", ["no"] * 4, exs)["overall"],
             "smol_lora": _result("smol_lora", [wrong] + ["no"] * 3, exs)["overall"]}
    assert board["smol_lora"]["parse"] == 0.25 and board["smol_lora"]["f1"] == 0
    text = judgement(board)
    assert text.startswith("No model is fit to deploy") and "Deploy **" not in text
    assert "smol_lora F1 0.0%, exact 0.0%, parse 25.0%" in text and "4 held-out prompts" in text
    one_right = '{"speaker":"HAMLET","first_word":"Y","line_count":9}'                  # one field of three right
    board["smol_lora"] = _result("smol_lora", [one_right] + ["no"] * 3, exs)["overall"]
    assert judgement(board).startswith("Deploy **smol_lora**")


def random_own(tmp_path, text):
    "A random own model (seed 0) and the folder of a 400-token tokenizer trained on `text`."
    from microlm.model import MicroLM
    from microlm.tokenizer import save_tokenizer, to_hf, train_bpe
    with pytest.warns(UserWarning): tok_dir = save_tokenizer(to_hf(train_bpe(text, 400)), tmp_path/"tok")
    torch.manual_seed(0)
    return MicroLM(replace(SMOKE.model, vocab_size=400)).eval(), tok_dir


def test_constrained_own_backend_keeps_each_prompts_schema(tmp_path):
    "`schemas` pair with prompts by position, through the length sorting of the batches; a count mismatch is an error."
    m, tok_dir = random_own(tmp_path, 'ROMEO. {"a": 1, "b": [true, false]} "yes" "no" 0123456789 ' * 50)
    schemas = [{"type": "boolean"}, {"type": "integer", "minimum": 0, "maximum": 9}, {"enum": ["yes", "no"]}]
    convs = [[{"role": "user", "content": "Answer." * k}] for k in (3, 1, 2)]   # sorted by length: 1, 2, 0
    answers = own_backend(m, tok_dir, max_new_tokens=8, batch_size=2, schemas=schemas)(convs)
    values = [json.loads(a) for a in answers]
    assert type(values[0]) is bool and type(values[1]) is int and values[2] in ("yes", "no"), answers
    with pytest.raises(ValueError, match="2 schemas for 3 prompts"):
        own_backend(m, tok_dir, max_new_tokens=8, schemas=schemas[:2])(convs)


def test_constrained_own_backend_closes_every_answer(tmp_path):
    "The task schemas on a random model with a short budget: with `close_within` every answer parses and validates."
    m, tok_dir = random_own(tmp_path, 'ROMEO. {"act": 1, "lines": [{"speaker": "A", "text": "x"}]} 0123456789 ' * 50)
    kinds = list(KINDS) * 2
    convs = [[{"role": "user", "content": f"{k} " * (i + 1)}] for i, k in enumerate(kinds)]
    answers = own_backend(m, tok_dir, max_new_tokens=72, batch_size=3, schemas=[SCHEMAS[k] for k in kinds],
                          close_within=56)(convs)
    scores = [score_answer(a, {}, SCHEMAS[k]) for a, k in zip(answers, kinds)]
    assert all(s["parsed"] and s["json_only"] and s["schema_valid"] for s in scores), answers
