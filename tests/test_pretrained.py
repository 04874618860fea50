"The pretrained track: spec resolution, PEFT LoRA trained by the own loop (adapter-only checkpoints, exact resume), merging."
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from microlm.config import SMOKE, LoraConfig, TrainConfig
from microlm.export import export_hf, load_hf
from microlm.model import MicroLM
from microlm.pretrained import merge_adapter, peft_model, resolve_pretrained
from microlm.sft import SFTBatches, encode_chat
from microlm.tokenizer import save_tokenizer, to_hf, train_bpe
from microlm.train import list_checkpoints, read_log, train

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows. " * 30
CFG = TrainConfig(batch_size=2, seq_len=48, max_steps=6, lr=1e-2, min_lr=1e-3, warmup_steps=1, weight_decay=0.0, eval_every=3,
                  eval_batches=1, ckpt_every=3, dtype="fp32")
LORA = LoraConfig(r=2, alpha=4)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    "A tiny Llama folder (the own model exported) with a real tokenizer and chat template."
    tok_dir = save_tokenizer(to_hf(train_bpe(TEXT, 300)), tmp_path_factory.mktemp("tok")/"tokenizer")
    torch.manual_seed(0)
    return export_hf(MicroLM(replace(SMOKE.model, vocab_size=300)), tok_dir, tmp_path_factory.mktemp("hf")/"base")


def _batches(tok, seed=0):
    convs = [[{"role": "user", "content": f"Who speaks {i}?"}, {"role": "assistant", "content": '{"speaker":"HAMLET"}'}]
             for i in range(8)]
    enc = [encode_chat(tok, c, CFG.seq_len + 1) for c in convs]
    return SFTBatches(enc, CFG.batch_size, tok.pad_token_id or 0, seed=seed)


def _run(base, out, **kw):
    torch.manual_seed(0)
    pm, tok = peft_model(base, LORA)
    s = train(pm, _batches(tok), CFG, out, valid=[_batches(tok, 1)()], meta={"config_hash": "t", "model_config": None},
              progress=False, **kw)
    return pm, s


def test_resolve_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not installed"): resolve_pretrained("gguf:no_such_pkg_xyz/a.gguf")
    with pytest.raises(FileNotFoundError, match="does not exist"): resolve_pretrained("gguf:microlm/nope.gguf")
    assert resolve_pretrained(str(tmp_path)) == (str(tmp_path), None)


def test_peft_model_wraps_the_targets(base):
    pm, _ = peft_model(base, LORA)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-2] for n, _ in pm.named_modules() if n.endswith("lora_A")} == set(LORA.target_modules)


def test_checkpoints_hold_the_adapter_only_and_resume_exactly(base, tmp_path):
    full, s_full = _run(base, tmp_path/"full")
    ck = list_checkpoints(tmp_path/"full"/"ckpt")[-1]
    keys = set(load_file(str(ck/"model.safetensors")))
    assert keys == {n for n, p in full.named_parameters() if p.requires_grad}       # no copy of the frozen base
    assert read_log(tmp_path/"full"/"log.jsonl")[-1]["step"] == CFG.max_steps
    _run(base, tmp_path/"cut", max_minutes=0)                                         # stops (and checkpoints) after one step
    assert [p.name for p in list_checkpoints(tmp_path/"cut"/"ckpt")] == ["step_000001"]
    resumed, s_res = _run(base, tmp_path/"cut")
    assert s_res["steps"] == CFG.max_steps and s_res["loss"] == s_full["loss"]
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        if a.requires_grad: assert torch.equal(a, b), n


def test_merged_adapter_equals_peft(base, tmp_path):
    pm, _ = _run(base, tmp_path/"run")
    pm.save_pretrained(tmp_path/"adapter")
    merged, _ = load_hf(merge_adapter(base, tmp_path/"adapter", tmp_path/"merged", dtype=torch.float32))
    ids = torch.tensor([list(range(5, 40))])
    with torch.no_grad(): assert (merged(ids).logits - pm(ids).logits).abs().max() < 1e-4
