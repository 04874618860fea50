"microlm.quant on the session's smoke run: GGUF types measured in llama.cpp with the evaluation's own yardsticks."

import json

import pytest

from microlm.evaluate import eval_examples, lm_metrics, own_backend
from microlm.export import gguf_path, llama_greedy, load_gguf, load_own
from microlm.quant import (
    gguf_lm_metrics,
    llama_backend,
    llama_batch_decode,
    llama_batch_speed,
    llama_speed,
    quant_quality,
)
from microlm.stages import STAGES, plan
from microlm.tokenizer import load_tokens
from microlm.train import split_bytes_per_token, token_meta


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # llama.cpp and torch beside each other


def test_f32_bits_per_byte_equal_the_own_model_and_q8_0_is_close(smoke_run):
    own = load_own(smoke_run, "own_sft")
    seq = min(smoke_run.preset.pretrain.seq_len, own.cfg.max_position_embeddings)
    ref = lm_metrics(own, load_tokens(smoke_run, "test"), split_bytes_per_token(token_meta(smoke_run), "test"), seq, 3)
    f32 = gguf_lm_metrics(smoke_run, gguf_path(smoke_run, "own_sft", "f32"), n_windows=3)
    q8 = gguf_lm_metrics(smoke_run, gguf_path(smoke_run, "own_sft", "q8_0"), n_windows=3)
    assert f32["windows"] == ref["windows"] == 3
    assert abs(f32["bpb"] - ref["bpb"]) < 1e-3 and abs(q8["bpb"] - f32["bpb"]) < 0.01


def test_llama_backend_answers_as_the_own_model(smoke_run):
    convs = [e["messages"][:-1] for e in eval_examples(smoke_run, 3)]
    ours = own_backend(load_own(smoke_run, "own_sft"), smoke_run / "tokenizer", 20, batch_size=1)(convs)
    assert llama_backend(gguf_path(smoke_run, "own_sft", "f32"), 20)(convs) == ours


def test_quant_quality_writes_json_and_plot(tmp_path, smoke_run):
    res = quant_quality(
        smoke_run, tmp_path, types=("f32", "q4_0"), n_prompts=3, max_new_tokens=16, n_windows=3, log=lambda s: None
    )
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["types"].keys() == {"f32", "q4_0"} and (tmp_path / "quality.png").stat().st_size > 0
    f32, q4 = saved["types"]["f32"], saved["types"]["q4_0"]
    assert f32["delta_bpb"] == 0.0 and q4["delta_bpb"] == round(q4["bpb"] - f32["bpb"], 4)
    assert q4["bpb"] != f32["bpb"]  # each type measured from its own file
    assert q4["bytes"] < f32["bytes"] / 3 and saved["prompts"] == 3 and res["model"] == "own_sft"
    assert all(r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and 0 <= r["f1"] <= 1 for r in saved["types"].values())


def test_llama_speed_reports_and_refuses(smoke_run):
    f = gguf_path(smoke_run, "own_sft", "q8_0")
    r = llama_speed(f, prompt_len=8, new_tokens=16, prefill_len=32, repeats=1)
    assert (r["engine"], r["file"], r["new"], r["prefill"]) == ("llama.cpp", f.name, 16, 32) and r["decode_tok_s"] > 0
    with pytest.raises(ValueError, match="do not fit the context of 128"):
        llama_speed(f, prompt_len=100, new_tokens=100)


def test_missing_type_is_a_clear_error(tmp_path, smoke_run):
    with pytest.raises(FileNotFoundError, match="own_sft-q5_0.gguf not found: run the export stage"):
        quant_quality(smoke_run, tmp_path, types=("q5_0",))


def test_quant_stage_runs_after_eval():
    assert set(STAGES["quant"].deps) == {"export", "eval"} and STAGES["quant"].outputs == ("quant",)
    assert plan("quant")[-2:] == ["eval", "quant"]
    assert list(STAGES).index("quant") == list(STAGES).index("eval") + 1


def test_batched_decoding_equals_one_sequence_at_a_time(smoke_run):
    f = gguf_path(smoke_run, "own_sft", "f32")
    prompts = [[5, 6, 7, 8, 9], [40, 41, 42, 43, 44], [300, 12, 99, 7, 1], [2, 2, 2, 2, 2]]
    together, secs = llama_batch_decode(f, prompts, 20)
    llm = load_gguf(f)
    try:
        compared = 0
        for p, ids in zip(prompts, together):
            alone = llama_greedy(llm, [p], 20)[0]  # stops at an end-of-turn token; the batch runs on
            assert len(ids) == 20 and ids[: len(alone)] == alone
            compared += len(alone)
        assert compared >= 20  # not an empty comparison: the answers alone hold tokens to agree on
    finally:
        llm.close()
    assert secs["decode_seconds"] > 0
    r = llama_batch_speed(f, 4, prompt_len=8, new_tokens=8, repeats=1)
    assert (r["batch"], r["new"]) == (4, 8) and r["decode_tok_s"] > 0
    with pytest.raises(ValueError, match="equal lengths"):
        llama_batch_decode(f, [[1, 2], [3]], 4)
    with pytest.raises(ValueError, match="do not fit the context of 128"):
        llama_batch_decode(f, [[1] * 100], 100)
