"LoRA invariants: merged == unmerged, own == PEFT-loaded, only adapters learn, adapter round trips and bad adapters."
import json, warnings
from dataclasses import replace
import pytest, torch
from microlm.config import SMOKE, seed_everything
from microlm.lora import (LoRALinear, apply_lora, load_adapter, lora_modules, merge_lora, read_adapter_config, save_adapter,
                          trainable_table)
from microlm.model import MicroLM, hf_model, load_model, save_model

def lora_model(seed=0, cfg=SMOKE.lora):
    seed_everything(seed); m = apply_lora(MicroLM(SMOKE.model), cfg)
    torch.manual_seed(seed + 1)
    for l in lora_modules(m).values(): torch.nn.init.normal_(l.lora_B.weight, std=0.05)  # a "trained" adapter
    return m.eval()

IDS = torch.randint(0, SMOKE.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))

def test_starts_as_the_base_and_only_lora_learns():
    seed_everything(0); base = MicroLM(SMOKE.model).eval()
    seed_everything(0); m = apply_lora(MicroLM(SMOKE.model), SMOKE.lora).eval()
    with torch.no_grad(): assert torch.equal(base(IDS).logits, m(IDS).logits)
    m = lora_model(); m.train(); m(IDS, labels=IDS).loss.backward()
    got = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == {n for n, _ in m.named_parameters() if ".lora_" in n}
    t = trainable_table(m)[-1]
    assert t["trainable"] == sum(p.numel() for n, p in m.named_parameters() if ".lora_" in n) and 0 < t["share"] < 0.2

def test_merged_equals_unmerged():
    m = lora_model()
    with torch.no_grad():
        a = m(IDS).logits
        for l in lora_modules(m).values(): l.merge()
        b = m(IDS).logits
        for l in lora_modules(m).values(): l.unmerge()
        c = m(IDS).logits
        d = merge_lora(m).eval()(IDS).logits
    assert (a - b).abs().max() < 1e-5 and (a - c).abs().max() < 1e-5 and (a - d).abs().max() < 1e-5
    assert not lora_modules(merge_lora(m))

def test_merged_model_saves_as_a_plain_model(tmp_path):
    m = lora_model(); merged = merge_lora(m)
    save_model(merged, tmp_path/"m")
    with torch.no_grad(): assert (load_model(tmp_path/"m")(IDS).logits - m(IDS).logits).abs().max() < 1e-5

def test_own_equals_peft(tmp_path):
    transformers = pytest.importorskip("transformers"); peft = pytest.importorskip("peft")
    m = lora_model(); save_adapter(m, tmp_path/"ad", SMOKE.lora, "microlm-smoke")
    cfg = json.loads((tmp_path/"ad/adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == SMOKE.lora.r
    seed_everything(0); base = MicroLM(SMOKE.model)
    hf = hf_model(SMOKE.model).eval()
    hf.load_state_dict(base.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore"); pm = peft.PeftModel.from_pretrained(hf, tmp_path/"ad").eval()
    with torch.no_grad(): own, theirs = m(IDS).logits, pm(input_ids=IDS).logits
    assert (own - theirs).abs().max() < 1e-5
    with torch.no_grad(): assert (base(IDS).logits - own).abs().max() > 1e-3   # the adapter really changes the output
    # PEFT's own save, loaded back into the own model
    pm.save_pretrained(tmp_path/"peft_saved")
    seed_everything(0); back = load_adapter(MicroLM(SMOKE.model), tmp_path/"peft_saved").eval()
    with torch.no_grad(): assert (back(IDS).logits - own).abs().max() < 1e-5

def test_bad_adapters(tmp_path):
    m = lora_model(); save_adapter(m, tmp_path/"ad", SMOKE.lora)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"): read_adapter_config(tmp_path)
    bigger = replace(SMOKE.model, hidden_size=128, num_attention_heads=4)
    from microlm.model import MicroLM as M
    with pytest.raises(ValueError, match="shape"): load_adapter(M(bigger), tmp_path/"ad")
    c = json.loads((tmp_path/"ad/adapter_config.json").read_text()); c["use_dora"] = True
    (tmp_path/"ad/adapter_config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match="DoRA"): read_adapter_config(tmp_path/"ad")
    with pytest.raises(ValueError, match="rank"): LoRALinear(torch.nn.Linear(4, 4), r=0, alpha=1)
    with pytest.raises(ValueError, match="already"): apply_lora(m, SMOKE.lora)

def test_compare_with_sft_needs_the_same_pretrained_model(tmp_path):
    "LoRA is compared with SFT only when SFT's record names the pretrained model LoRA starts from (not one before a restart)."
    from microlm.config import Run, atomic_write
    from microlm.lora import compare_with_sft
    from microlm.stages import marker_path
    run = Run(tmp_path, "smoke")
    atomic_write(marker_path(run, "pretrain"), {"outputs_digest": "new"})
    atomic_write(tmp_path / "sft" / "log.jsonl", '{"step": 0, "val_loss": 7.0}\n{"step": 20, "val_loss": 6.0}\n')
    lora = [{"step": 0, "val_loss": 7.0}, {"step": 20, "val_loss": 6.5}]
    assert compare_with_sft(run, lora) == {}  # no SFT record
    atomic_write(marker_path(run, "sft"), {"upstream": {"pretrain": "old"}})
    assert compare_with_sft(run, lora) == {}  # SFT of another pretrained model
    atomic_write(marker_path(run, "sft"), {"upstream": {"pretrain": "new"}})
    assert compare_with_sft(run, lora) == dict(sft_val_drop_same_steps=1.0, sft_step=20, lora_vs_sft=0.5)
