"""How the own generate's batching moves the leaderboard's own scores: greedy answers to the same prompts, batched.

    .venv/bin/python tools/batch_check.py runs/small     # -> nbs/results/batch_check.json (17_evaluate; ~3 min)

The own `generate` left-pads a batch; each row has its own prompt's budget (`Decoding.budgets`; before commit a9b0755
every row had the longest prompt's, and short prompts batched with long ones had their answers cut). This scores the
own models of a kept run on the leaderboard's 120 test-play prompts (17_evaluate) at the eval section's batch size and
at smaller ones, greedily, with `score_model` (11_dpo): the scores should not depend on the batch.
"""
import argparse, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from microlm.config import Run, atomic_write, machine  # noqa: E402
from microlm.dpo import score_model  # noqa: E402
from microlm.evaluate import eval_examples  # noqa: E402
from microlm.model import load_model  # noqa: E402
from microlm.tokenizer import load_tokenizer  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--models", nargs="+", default=["sft", "dpo", "rl"], help="stages of the run whose models to score")
    ap.add_argument("--out", type=Path, default=ROOT / "nbs" / "results" / "batch_check.json")
    a = ap.parse_args()
    run = Run(a.run)
    tok, ex, cfg = load_tokenizer(run / "tokenizer"), eval_examples(run), run.preset.eval
    rows = []
    for stage in a.models:
        model = load_model(run / stage).eval()
        for bs in sorted({cfg.batch_size, 8, 1}, reverse=True):
            s = score_model(model, tok, ex, cfg.max_new_tokens, batch_size=bs)
            scores = {k: round(s[k], 4) for k in ("f1", "exact", "parse")}
            rows.append(dict(model=f"own_{stage}", batch_size=bs, **scores))
            print(rows[-1], flush=True)
    atomic_write(a.out, dict(run=str(run.root), prompts=len(ex), max_new_tokens=cfg.max_new_tokens, rows=rows,
                             machine=machine()))
    print(f"wrote {a.out}")
