"""The training benchmark of 06_train on a CUDA machine: microlm against `transformers.LlamaForCausalLM`, same config and batch.

    PYTHONPATH=. python tools/gpu_bench.py --out gpu_bench.json

For each preset: training tokens/s of the very `train_step` the pretraining loop uses (bf16 autocast, fused AdamW,
clipping), eager and `torch.compile`d, the ratio, and MFU against a measured bf16 matmul peak. Also checks on the GPU
that our logits equal transformers' in fp32, and that `train()` runs, checkpoints and resumes there.
"""
import argparse, json, platform, sys, tempfile, time
from pathlib import Path

import numpy as np
import torch


def matmul_peak(n=8192, reps=10) -> float:
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3): a @ b
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(reps): a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def bench(models: dict, vocab: int, batch_size: int, seq_len: int, steps: int, warmup: int) -> dict:
    "Median training tokens/s per model, alternating the models step by step."
    from microlm.config import TrainConfig
    from microlm.train import TokenWindows, make_optimizer, train_step
    dev = torch.device("cuda")
    cfg = TrainConfig(batch_size=batch_size, seq_len=seq_len, dtype="bf16")
    src = TokenWindows(np.random.default_rng(0).integers(0, vocab, 1_000_000).astype(np.uint16), batch_size, seq_len)
    opts = {k: make_optimizer(m, cfg) for k, (m, _) in models.items()}
    times = {k: [] for k in models}
    for i in range(warmup + steps):
        xy = src()
        for k, (m, fwd) in models.items():
            torch.cuda.synchronize(); t = time.perf_counter()
            train_step(fwd, opts[k], [xy], cfg.grad_clip, dev, torch.bfloat16)
            torch.cuda.synchronize()
            if i >= warmup: times[k].append(time.perf_counter() - t)
    return {k: batch_size * seq_len / float(np.median(v)) for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_bench.json")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available(): sys.exit("gpu_bench: no CUDA device")
    from transformers import LlamaConfig, LlamaForCausalLM
    from microlm.config import BASE, SMALL, SMOKE, seed_everything
    from microlm.fastpath import FastMicroLM
    from microlm.model import MicroLM, to_hf_config
    from microlm.speedrun import train_flops_per_token
    peak = matmul_peak()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
           "bf16_matmul_peak_tflops": round(peak / 1e12, 1), "rows": []}
    print(f"{res['device']}: bf16 matmul {peak / 1e12:.0f} TFLOP/s", flush=True)

    # fp32 parity on the GPU (TF32 off): the first link of the parity chain, on another backend
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    seed_everything(0); ours = MicroLM(SMALL.model).cuda().eval()
    hf = LlamaForCausalLM(LlamaConfig(**to_hf_config(SMALL.model), attn_implementation="sdpa")).cuda().eval()
    hf.load_state_dict(ours.state_dict())
    ids = torch.randint(0, SMALL.model.vocab_size, (4, 256), device="cuda")
    with torch.no_grad(): res["fp32_max_abs_diff_vs_hf"] = (ours(ids).logits - hf(ids).logits).abs().max().item()
    print("fp32 logits, max |ours - transformers| on GPU:", res["fp32_max_abs_diff_vs_hf"], flush=True)
    del ours, hf

    for p, bs in ((SMOKE, 8), (SMALL, 16), (BASE, 32)):
        T = p.pretrain.seq_len
        seed_everything(0); ours = FastMicroLM(p.model).cuda()
        seed_everything(0); hf = LlamaForCausalLM(LlamaConfig(**to_hf_config(p.model), attn_implementation="sdpa")).cuda()
        models = {"ours": (ours, ours), "hf": (hf, hf)}
        if not a.no_compile: models.update({"ours_compiled": (ours, torch.compile(ours)), "hf_compiled": (hf, torch.compile(hf))})
        t0 = time.perf_counter()
        r = bench(models, p.model.vocab_size, bs, T, a.steps, warmup=5)
        fl = train_flops_per_token(p.model, T)
        row = {"preset": p.name, "params_M": round(sum(q.numel() for q in ours.parameters()) / 1e6, 2), "batch": f"{bs}x{T}",
               **{f"{k}_tok_s": round(v) for k, v in r.items()}, "ratio_eager": round(r["ours"] / r["hf"], 3),
               "mfu_ours_eager": round(r["ours"] * fl / peak, 4), "seconds": round(time.perf_counter() - t0, 1)}
        if "ours_compiled" in r:
            row["ratio_compiled"] = round(r["ours_compiled"] / r["hf_compiled"], 3)
            row["mfu_ours_compiled"] = round(r["ours_compiled"] * fl / peak, 4)
        res["rows"].append(row); print(json.dumps(row), flush=True)
        del ours, hf, models; torch.cuda.empty_cache()

    # the loop itself on CUDA: train, stop, resume from the checkpoint, finish
    from dataclasses import replace
    from microlm.train import TokenWindows, train
    cfg = replace(SMALL.pretrain, max_steps=60, ckpt_every=30, eval_every=30, eval_batches=2, warmup_steps=5)
    toks = np.random.default_rng(1).integers(0, SMALL.model.vocab_size, 500_000).astype(np.uint16)
    out = Path(tempfile.mkdtemp())
    seed_everything(0); m = FastMicroLM(SMALL.model)
    meta = {"config_hash": "gpu_bench", "model_config": None}        # the same for both calls, so the second resumes
    s1 = train(m, TokenWindows(toks, cfg.batch_size, cfg.seq_len), replace(cfg, max_steps=30), out, meta=meta, progress=False)
    seed_everything(0); m2 = FastMicroLM(SMALL.model)
    s2 = train(m2, TokenWindows(toks, cfg.batch_size, cfg.seq_len), cfg, out, meta=meta, progress=False)
    res["train_on_cuda"] = {"first_steps": s1["steps"], "resumed_to": s2["steps"], "loss": s2["loss"], "tok_s": s2["tok_s"]}
    print("train() on CUDA:", res["train_on_cuda"], flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__": main()
