"Invariants of microlm.export: export parity (logits, greedy tokens, chat template), refusals, PEFT on the own adapter."
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from microlm.config import SMOKE, LoraConfig, Run
from microlm.generate import default_stop_ids, generate
from microlm.export import (check_exportable, export_adapter, export_hf, export_stage, hf_greedy, hf_to_own, load_hf,
                            max_logit_diff, peft_logit_diff)
from microlm.model import MicroLM
from microlm.tokenizer import load_tokenizer, save_tokenizer, to_hf, train_bpe

import transformers
transformers.utils.logging.set_verbosity_error()

TEXT = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer the slings and arrows "
        "of outrageous fortune, or to take arms against a sea of troubles. ") * 40
CONVS = [[{"role": "user", "content": "Who speaks first?"}],
         [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Who?"},
          {"role": "assistant", "content": '{"speaker":"HAMLET"}'}, {"role": "user", "content": "And then?"}]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: threads only add contention


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")/"tokenizer"
    with pytest.warns(UserWarning): bpe = train_bpe(TEXT, 400)
    return save_tokenizer(to_hf(bpe), d)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MicroLM(replace(SMOKE.model, vocab_size=400)).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model, tok_dir):
    return export_hf(model, tok_dir, tmp_path_factory.mktemp("hf")/"own")


def test_export_files_and_config(exported):
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    cfg = json.loads((exported/"config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama" and "auto_map" not in cfg
    gen = json.loads((exported/"generation_config.json").read_text())
    assert sorted(gen["eos_token_id"]) == [0, 2]               # <|endoftext|> and <|im_end|>


def test_logits_parity(model, exported):
    hf, tok = load_hf(exported)                                # plain transformers, no trust_remote_code
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = torch.tensor([tok.encode(TEXT)[:40], tok.encode(TEXT[100:])[:40]])
    assert max_logit_diff(model, hf, ids) < 1e-5


def test_greedy_parity(model, exported, tok_dir):
    hf, _ = load_hf(exported)
    tok = load_tokenizer(tok_dir)
    prompts = [tok.apply_chat_template(c, add_generation_prompt=True, return_dict=False) for c in CONVS]
    ours = [g.ids for g in generate(model, prompts, 20, stop_token_ids=default_stop_ids(tok))]
    assert ours == hf_greedy(hf, prompts, 20)
    assert all(len(o) > 0 for o in ours)


def test_greedy_parity_rows_near_the_context(model, exported):
    "Batched beside a prompt that nearly fills the context, every row still gets its own budget in both engines."
    hf, _ = load_hf(exported)
    ctx, g = model.cfg.max_position_embeddings, torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 200, (n,), generator=g).tolist() for n in (ctx - 6, 3, ctx // 2)]
    ours = [r.ids for r in generate(model, prompts, 24, stop_token_ids=[0])]
    assert len(ours[0]) <= 6 and max(len(o) for o in ours) > 6  # the long row's budget binds only that row
    assert hf_greedy(hf, prompts, 24, stop_ids=[0], batch_size=3) == ours == hf_greedy(hf, prompts, 24, stop_ids=[0])


def test_chat_template_identical(exported, tok_dir):
    ours, theirs = load_tokenizer(tok_dir), transformers.AutoTokenizer.from_pretrained(exported)
    for c in CONVS:
        for gp in (True, False):
            assert theirs.apply_chat_template(c, tokenize=False, add_generation_prompt=gp) == \
                   ours.apply_chat_template(c, tokenize=False, add_generation_prompt=gp)
    assert (exported/"tokenizer.json").read_bytes() == (Path(tok_dir)/"tokenizer.json").read_bytes()


def test_qk_norm_exports_as_qwen3_with_parity(tmp_path, tok_dir):
    "A model with QK-norm is a Qwen3: transformers loads it as Qwen3ForCausalLM, same logits and greedy tokens."
    torch.manual_seed(1)
    m = MicroLM(replace(SMOKE.model, vocab_size=400, qk_norm=True)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)  # gains that are not all ones: a norm in the wrong place shows
    out = export_hf(m, tok_dir, tmp_path/"qwen3")
    cfg = json.loads((out/"config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["model_type"] == "qwen3"
    assert not cfg.get("use_sliding_window") and cfg["head_dim"] == m.cfg.head_dim
    hf, tok = load_hf(out)
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    ids = torch.tensor([tok.encode(TEXT)[:40], tok.encode(TEXT[100:])[:40]])
    assert max_logit_diff(m, hf, ids) < 1e-5
    prompts = [tok.apply_chat_template(c, add_generation_prompt=True, return_dict=False) for c in CONVS]
    assert [g.ids for g in generate(m, prompts, 20, stop_token_ids=default_stop_ids(tok))] == hf_greedy(hf, prompts, 20)
    from microlm.export import LlamaCppLM, export_gguf, llama_greedy, load_gguf
    import gguf
    f = export_gguf(out, tmp_path/"q.gguf")
    assert gguf.GGUFReader(f).fields["general.architecture"].contents() == "qwen3"
    llm = load_gguf(f, logits_all=True, n_threads=1)
    assert max_logit_diff(m, LlamaCppLM(llm), ids) < 1e-4
    llm.close()
    llm = load_gguf(f, n_threads=1)
    assert llama_greedy(llm, prompts, 20) == [g.ids for g in generate(m, prompts, 20, stop_token_ids=default_stop_ids(tok))]
    llm.close()
    cfg["architectures"] = ["MistralForCausalLM"]
    (out/"config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GGUF is written here for one of"): export_gguf(out, tmp_path/"m.gguf")
    assert not (tmp_path/"m.gguf").exists()


def test_refuses_what_vllm_cannot_serve(tmp_path, tok_dir):
    for option, msg in ((dict(hidden_act="relu2"), "run only 'silu'"), (dict(logit_softcap=30.0), "logit_softcap=30.0")):
        m = MicroLM(replace(SMOKE.model, vocab_size=400, **option))
        with pytest.raises(ValueError, match=msg): export_hf(m, tok_dir, tmp_path/"x")
        assert not (tmp_path/"x").exists()


def test_refuses_unsupported_head_size():
    bad = type("Cfg", (), {"head_dim": 48, "vocab_size": 1024})()
    with pytest.raises(ValueError, match="head size 48"): check_exportable(bad, 1024)


def test_refuses_tokenizer_larger_than_embedding(tmp_path, tok_dir):
    torch.manual_seed(0)
    small = MicroLM(replace(SMOKE.model, vocab_size=300))
    with pytest.raises(ValueError, match="embedding only 300"): export_hf(small, tok_dir, tmp_path/"x")
    assert not (tmp_path/"x").exists()


def test_peft_loads_own_adapter(tmp_path, model, tok_dir):
    from microlm.lora import apply_lora, lora_modules, merge_lora, save_adapter
    import copy
    lcfg = LoraConfig(r=4, alpha=8, dropout=0.0)
    lm = apply_lora(copy.deepcopy(model), lcfg).eval()
    torch.manual_seed(1)
    for m in lora_modules(lm).values(): torch.nn.init.normal_(m.lora_B.weight, std=0.05)   # a non-trivial adapter
    save_adapter(lm, tmp_path/"adapter", lcfg, base_model_name_or_path="somewhere/else")
    base = export_hf(model, tok_dir, tmp_path/"own_base")
    merged = merge_lora(lm).eval()
    ad = export_adapter(tmp_path/"adapter", base, tmp_path/"own_lora_adapter")
    assert json.loads((ad/"adapter_config.json").read_text())["base_model_name_or_path"] == str(base.absolute())
    ids = torch.tensor([list(range(5, 45))])
    assert peft_logit_diff(base, ad, merged, ids) < 1e-5
    with torch.no_grad():
        assert (merged(ids).logits - model(ids).logits).abs().max() > 1e-3      # the adapter really changes the model
        assert (lm(ids).logits - merged(ids).logits).abs().max() < 1e-5


def test_export_stage_names_missing_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"): export_stage(Run(tmp_path, "smoke"))


def test_hf_to_own_reads_llama_and_qwen3_folders(tmp_path, model, exported, tok_dir):
    "Any Llama or Qwen3 folder becomes a MicroLM with the same weights (the inverse of export_hf), in its stored dtype."
    own = hf_to_own(exported)
    assert own.cfg == model.cfg and all(torch.equal(a, b) for a, b in zip(own.state_dict().values(), model.state_dict().values()))
    hf, _ = load_hf(exported)
    ids = torch.randint(0, 400, (2, 12))
    assert max_logit_diff(own, hf, ids) < 1e-5
    torch.manual_seed(3)
    q = MicroLM(replace(SMOKE.model, vocab_size=400, qk_norm=True, tie_word_embeddings=False)).eval()
    hf_q = load_hf(export_hf(q, tok_dir, tmp_path/"qwen3"))[0]
    hf_q.to(torch.bfloat16).save_pretrained(tmp_path/"bf16")               # a folder stored in bf16, as SmolLM2 is
    back = hf_to_own(tmp_path/"bf16")
    assert back.cfg == q.cfg and back.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(back.lm_head.weight, q.lm_head.weight.bfloat16())
    assert hf_to_own(tmp_path/"bf16", dtype=torch.float32).lm_head.weight.dtype == torch.float32
    for load in (hf_to_own, load_hf):
        with pytest.raises(FileNotFoundError, match="nothing: no config.json"): load(tmp_path/"nothing")
