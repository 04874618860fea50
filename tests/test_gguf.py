"GGUF export and llama.cpp as the fourth engine of the parity chain, on the session's smoke run (through export)."

import ctypes
import json
import shutil
from dataclasses import replace

import gguf
import llama_cpp  # tools/setup.sh builds and installs it (the `llama` extra)
import pytest
import torch

from microlm.config import SMOKE
from microlm.export import (
    GGUF_EXPORT,
    OWN_MODELS,
    LlamaCppLM,
    export_gguf,
    export_hf,
    gguf_chat_prompt,
    gguf_chat_template,
    gguf_path,
    gguf_stop_ids,
    hf_greedy,
    llama_chat,
    llama_greedy,
    load_gguf,
    load_hf,
    load_own,
    max_logit_diff,
)
from microlm.generate import chat_prompt, default_stop_ids, generate
from microlm.model import MicroLM
from microlm.tasks import split_tasks
from microlm.tokenizer import decode, encode, load_tokenizer, load_tokens

TRICKY = [
    "To be,  or not   to be:\n\n\tthat is the question.",
    "I'll say't, he's gone — 'tis 1601, 33 3333 3.14!",
    "Café naïve: 你好, 🚀🦙  \n \n",
    "   leading and trailing   ",
    "\n\n\n",
    "a\r\nb  \t c",
    '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n{"a": 1}<|im_end|><|endoftext|><|pad|>',
    "<|im_end |> is not a special token, <|im_end|> is",
]
CONVS = [
    [{"role": "user", "content": "Who speaks first?"}],
    [
        {"role": "system", "content": "Answer in JSON."},
        {"role": "user", "content": "Who?"},
        {"role": "assistant", "content": '{"speaker":"HAMLET"}'},
        {"role": "user", "content": "And  then?\n"},
    ],
    [{"role": "user", "content": TRICKY[2]}],
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # llama.cpp and torch beside each other


@pytest.fixture(scope="module")
def tok(smoke_run):
    return load_tokenizer(smoke_run / "tokenizer")


@pytest.fixture(scope="module")
def f32(smoke_run):
    llm = load_gguf(gguf_path(smoke_run, "own_sft", "f32"))
    yield llm
    llm.close()


def test_export_stage_writes_every_type(smoke_run):
    want = sorted(f"{n}-{t}.gguf" for n in OWN_MODELS for t in GGUF_EXPORT)
    assert sorted(p.name for p in (smoke_run / "gguf").iterdir()) == want
    sizes = {t: gguf_path(smoke_run, "own_sft", t).stat().st_size for t in GGUF_EXPORT}
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"] > sizes["q4_0"]


@pytest.mark.parametrize("name", OWN_MODELS)
@pytest.mark.parametrize("type", GGUF_EXPORT)
def test_every_file_loads_in_llama_cpp(smoke_run, name, type):
    llm = load_gguf(gguf_path(smoke_run, name, type))
    try:
        assert llm.n_vocab() == SMOKE.model.vocab_size and llm.metadata["general.architecture"] == "llama"
        assert llm.metadata["general.file_type"] == str(
            int(gguf.LlamaFileType[{"f32": "ALL_F32"}.get(type, f"MOSTLY_{type.upper()}")])
        )
        assert llama_greedy(llm, [[5, 6, 7]], 4)[0]  # it runs
    finally:
        llm.close()


def test_metadata_and_tokenizer_fields(smoke_run, tok):
    r = gguf.GGUFReader(gguf_path(smoke_run, "own_sft", "q4_0"))
    f = lambda k: r.fields[k].contents()
    assert (f("tokenizer.ggml.model"), f("tokenizer.ggml.pre"), f("tokenizer.ggml.add_bos_token")) == (
        "gpt2",
        "gpt-2",
        False,
    )
    assert f("tokenizer.ggml.eos_token_id") == tok.convert_tokens_to_ids("<|im_end|>")
    assert f("tokenizer.ggml.padding_token_id") == tok.pad_token_id
    assert f("tokenizer.chat_template") == gguf_chat_template(tok.chat_template)
    assert "{%- generation %}" in tok.chat_template and "generation %}" not in f("tokenizer.chat_template")
    types = f("tokenizer.ggml.token_type")
    assert [types[i] for i in range(4)] == [gguf.TokenType.CONTROL] * 4 and set(types[4:]) <= {1, 5}
    kinds = {t.name: t.tensor_type.name for t in r.tensors}
    assert (
        kinds["token_embd.weight"] == "Q8_0" and kinds["blk.0.attn_q.weight"] == "Q4_0"
    )  # output matrix kept at 8 bits
    assert kinds["blk.0.attn_norm.weight"] == "F32" and "output.weight" not in kinds  # tied embedding


@pytest.mark.parametrize("name", OWN_MODELS)
def test_f32_logits_match_own_model(smoke_run, name):
    ids = torch.from_numpy(load_tokens(smoke_run, "valid")[:100].astype("int64"))[None]
    llm = load_gguf(gguf_path(smoke_run, name, "f32"), logits_all=True)
    try:
        assert max_logit_diff(load_own(smoke_run, name), LlamaCppLM(llm), ids) < 1e-4
    finally:
        llm.close()


def test_f32_greedy_equals_own_generate_and_transformers(smoke_run, tok, f32):
    tasks = split_tasks(smoke_run, "test")[0][:4]
    prompts = [chat_prompt(tok, e["messages"][:1])[-70:] for e in tasks]
    prompts += [encode(tok, s) for s in ("To be, or not to be", "ROMEO.\nBut soft, what light", "\n\n")]
    own = load_own(smoke_run, "own_sft")
    ours = [g.ids for g in generate(own, prompts, 40, stop_token_ids=default_stop_ids(tok))]
    assert llama_greedy(f32, prompts, 40) == ours
    assert hf_greedy(load_hf(smoke_run / "hf" / "own_sft")[0], prompts, 40) == ours
    assert sum(map(len, ours)) > 40  # something was generated


def test_stop_ids_are_the_turn_and_document_ends(f32, tok):
    assert gguf_stop_ids(f32) == sorted(default_stop_ids(tok))


def test_tokenizer_round_trip_equals_tokenizers(f32, tok):
    for s in TRICKY:
        ids = f32.tokenize(s.encode(), add_bos=False, special=True)
        assert ids == encode(tok, s), s
        assert f32.detokenize(ids, special=True).decode() == decode(tok, ids) == s


def test_chat_template_renders_equally(f32, tok):
    for c in CONVS:
        assert gguf_chat_prompt(f32, c) == tok.apply_chat_template(c, add_generation_prompt=True, return_dict=False)
        assert gguf_chat_prompt(f32, c, add_generation_prompt=False) == tok.apply_chat_template(c, return_dict=False)


def cpp_chat_template(llm, conv) -> str:
    "llama.cpp's built-in C++ renderer (llama_chat_apply_template) for the file's template."
    msgs = (llama_cpp.llama_chat_message * len(conv))(
        *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in conv]
    )
    buf = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_chat_apply_template(
        llm.metadata["tokenizer.chat_template"].encode(), msgs, len(conv), True, buf, 4096
    )
    assert n > 0, "llama.cpp did not recognise the chat template"
    return buf.raw[:n].decode()


def test_cpp_chat_template_recognises_chatml(f32, tok):
    for c in CONVS:
        assert cpp_chat_template(f32, c) == tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)


def test_chat_completion_equals_own_reply(smoke_run, f32, tok):
    own = load_own(smoke_run, "own_sft")
    theirs = generate(
        own, [chat_prompt(tok, c) for c in CONVS], 30, tokenizer=tok, stop_token_ids=default_stop_ids(tok)
    )
    assert [llama_chat(f32, c, 30) for c in CONVS] == [g.text for g in theirs]


def test_refuses_a_type_whose_blocks_do_not_divide_a_row(tmp_path, smoke_run):
    torch.manual_seed(0)
    cfg = replace(SMOKE.model, intermediate_size=200, tie_word_embeddings=False)  # 200 is no multiple of 32
    m = MicroLM(cfg).eval()
    folder = export_hf(m, smoke_run / "tokenizer", tmp_path / "odd")
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_down\.weight has shape \(64, 200\).*Q4_0 blocks of 32"):
        export_gguf(folder, tmp_path / "odd-q4_0.gguf", "q4_0")
    assert not (tmp_path / "odd-q4_0.gguf").exists()
    llm = load_gguf(export_gguf(folder, tmp_path / "odd-f16.gguf", "f16"), logits_all=True)  # f16 has no blocks
    try:
        ids = torch.tensor([list(range(10, 60))])
        assert max_logit_diff(m, LlamaCppLM(llm), ids) < 0.05  # untied: output.weight written
    finally:
        llm.close()


def test_bad_input_errors(tmp_path, smoke_run, f32):
    hf = smoke_run / "hf" / "own_sft"
    with pytest.raises(ValueError, match="unknown type 'q4_k'"):
        export_gguf(hf, tmp_path / "x.gguf", "q4_k")
    with pytest.raises(FileNotFoundError, match="config.json"):
        export_gguf(tmp_path / "nowhere", tmp_path / "x.gguf")
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        load_gguf(tmp_path / "missing.gguf")
    bad = tmp_path / "bad_tok"
    shutil.copytree(hf, bad)
    spec = json.loads((bad / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Lowercase"}
    (bad / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="tokenizer.json: llama.cpp's gpt2 tokenizer needs a byte-level BPE"):
        export_gguf(bad, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="leaves no room in the context of 128"):
        llama_greedy(f32, [[5] * 128], 4)
    with pytest.raises(ValueError, match="logits_all=True"):
        LlamaCppLM(f32)
    assert not (tmp_path / "x.gguf").exists()
