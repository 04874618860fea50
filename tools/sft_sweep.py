"""How much SFT the `small` model needs: SFT settings on one run's pretrained model, scored on the same prompts.

    .venv/bin/python tools/sft_sweep.py runs/small          # -> nbs/results/sft_sweep.json (about 20 minutes)

Each setting is a set of overrides of the run's preset (`{}` is the run itself: its own, current `sft` stage).
The others are trained in scratch runs under `runs/sft_sweep/` that share the run's data, tokenizer and pretrained
weights (hard links), then every SFT model answers the same prompts greedily: 120 held-out *valid*-play prompts
(the plays the settings were chosen on) and the leaderboard's 120 *test*-play prompts (17_evaluate). 09_sft renders
the table from the JSON; nothing here is typed into prose.
"""
import argparse, json, os, shutil, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from microlm.config import Run, atomic_write, machine  # noqa: E402
from microlm.dpo import heldout_examples, sample_answers, score_model  # noqa: E402
from microlm.evaluate import eval_examples  # noqa: E402
from microlm.model import load_model  # noqa: E402
from microlm.speedrun import apply_overrides, trial_run  # noqa: E402
from microlm.stages import ensure, is_current, run_stage  # noqa: E402
from microlm.tokenizer import load_tokenizer  # noqa: E402
from microlm.train import read_log  # noqa: E402

SETTINGS = {  # name -> overrides of the run's preset
    "60 tasks/play, 300 steps": {"sft_data": {"tasks_per_play": 60}, "sft": {"max_steps": 300}},
    "200 tasks/play, 400 steps, lr 2e-3": {"sft": {"max_steps": 400, "lr": 2e-3, "min_lr": 2e-4}},
    "200 tasks/play, 600 steps (preset)": {},
}
KEYS = ("f1", "exact", "parse", "schema_valid")


def sft_run(base: Run, name: str, overrides: dict, work: Path) -> Run:
    "The run whose `sft` stage is `name`'s setting: `base` for no overrides, else a scratch run (kept if current)."
    if not overrides:
        return base
    d = work / name.replace(" ", "_").replace("/", "-").replace(",", "")
    preset = apply_overrides(base.preset, overrides)
    if not ((d / "config.json").exists() and Run(d).preset == preset):
        run = trial_run(base, d, base.preset.seed, overrides)
        shutil.copytree(base / "pretrain", d / "pretrain", copy_function=os.link, ignore=shutil.ignore_patterns("ckpt"))
        shutil.copy(base / ".stages" / "pretrain.json", d / ".stages" / "pretrain.json")
    return Run(d)


def sweep(base: Run, settings: dict, work: Path) -> dict:
    ensure(base, "sft")
    tok, L = load_tokenizer(base / "tokenizer"), base.preset.sft.seq_len
    prompts = {"valid": heldout_examples(base, 120, L), "test": eval_examples(base)}
    shown = [e for e in prompts["test"] if e["kind"] == "repair"][:4]  # answers shown beside the gold
    rows = []
    for name, ov in settings.items():
        run, t0 = sft_run(base, name, ov, work), time.time()
        was_current = is_current(run, "sft")
        summary = run_stage(run, "sft", log=print, progress=False)
        marker = json.loads((run / ".stages" / "sft.json").read_text())
        model = load_model(run / "sft")
        scores = {k: score_model(model, tok, ex, base.preset.eval.max_new_tokens) for k, ex in prompts.items()}
        answers = [g[0].text for g in sample_answers(model, tok, shown, 1, 0.0, base.preset.eval.max_new_tokens)]
        rows.append(
            dict(
                setting=name,
                overrides=ov,
                steps=summary["steps"],
                train_examples=summary["examples"]["train"],
                val_loss=summary["val_loss"],
                sft_seconds=marker["seconds"],
                sft_machine=marker.get("machine"),
                reused=was_current,
                **{f"{k}_{m}": round(s[m], 4) for k, s in scores.items() for m in KEYS},
                curve=[(r["step"], r["val_loss"]) for r in read_log(run / "sft" / "log.jsonl") if "val_loss" in r],
                answers=[dict(prompt=e["messages"][0]["content"], gold=e["messages"][1]["content"], answer=a)
                         for e, a in zip(shown, answers)],
            )
        )
        print(json.dumps(rows[-1]), f"({time.time() - t0:.0f} s)", flush=True)
    return dict(run=str(base.root), preset=base.preset.name, prompts={k: len(v) for k, v in prompts.items()},
                machine=machine(), rows=rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "sft_sweep")
    ap.add_argument("--out", type=Path, default=ROOT / "nbs" / "results" / "sft_sweep.json")
    a = ap.parse_args()
    res = sweep(Run(a.run), SETTINGS, a.work)
    atomic_write(a.out, res)
    print(f"wrote {a.out}")
