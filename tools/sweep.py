"""Settings of one fine-tuning stage (`sft`, `dpo` or `rl`) on one run, every model scored on the same prompts.

    .venv/bin/python tools/sweep.py sft runs/small      # -> nbs/results/sft_sweep.json (09_sft; ~10 min a setting)
    .venv/bin/python tools/sweep.py dpo runs/small      # -> nbs/results/dpo_sweep.json (11_dpo; ~3 min a setting)
    .venv/bin/python tools/sweep.py rl runs/small       # -> nbs/results/rl_sweep.json (12_rl; ~5 min a setting)
    .venv/bin/python tools/sweep.py rl_prompts runs/small # -> nbs/results/rl_prompts_sweep.json (12_rl: RL on new
                                                          #    train-play tasks; ~5 min a setting)
    .venv/bin/python tools/sweep.py rl_start runs/small # -> nbs/results/rl_start_sweep.json (12_rl: RL from
                                                        #    SFT models trained less; ~10 min a setting, the
                                                        #    240-step ones ~23)
    .venv/bin/python tools/sweep.py names runs/small    # -> nbs/results/names_sweep.json (09_sft: SFT with and
                                                        #    without 08_tasks' invented speaker names; ~10 min a setting)
    .venv/bin/python tools/sweep.py headroom runs/small # -> nbs/results/rl_headroom.json (12_rl: what sampling can
                                                        #    reach; trains nothing; ~12 min)
    .venv/bin/python tools/sweep.py headroom \
        "runs/rl_start_sweep/SFT_150_steps;_RL_120_steps_lr_3e-4_invalid_penalty_0.5" --train \
        --out nbs/results/rl_headroom_weak_start.json   # (12_rl: the weakest start's room, and where its RL
                                                        #  learned; after `rl_start`; ~12 min)

Each setting is a set of overrides of the run's preset (`{}` is the run itself: its own, current stage). The others
are trained in scratch runs under `runs/STAGE_sweep/` that share the run's data, tokenizer and those stages the swept
stage starts from that the overrides leave alone (hard links; the others are trained there too). Then every model
answers the same prompts greedily: 120 held-out *valid*-play prompts (the plays the settings were chosen on) and the
leaderboard's 120 *test*-play prompts (17_evaluate). For `dpo` and `rl` the model they start from answers them too (a
row that retrains it has its own `start`), so a row's gain is measured on the same prompts. Scratch runs still
current are reused.

`headroom` trains nothing: the run's RL start and RL model each answer both prompt sets greedily and with HEADROOM's k
samples per prompt at each temperature, scored as the leaderboard scores (12_rl's `answer_scores` and `best_of_n`),
over all prompts and per task kind: what RL can sharpen towards. With `--train` it also scores 120 prompts from the
pool the RL stage draws its train prompts from: where its reward is earned, against where the leaderboard measures.
The notebooks render the tables from the JSON; nothing here is typed into prose.
"""
import argparse, collections, json, os, random, shutil, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from microlm.config import Run, atomic_write, machine  # noqa: E402
from microlm.dpo import graded_answers, heldout_examples  # noqa: E402
from microlm.evaluate import eval_examples  # noqa: E402
from microlm.model import load_model  # noqa: E402
from microlm.rl import answer_scores, best_of_n, train_prompts  # noqa: E402
from microlm.sft import finetune_data, padded_share  # noqa: E402
from microlm.speedrun import apply_overrides, trial_run  # noqa: E402
from microlm.stages import ensure, get_stage, is_current, plan, read_marker, run_stage  # noqa: E402
from microlm.tasks import aggregate  # noqa: E402
from microlm.tokenizer import load_tokenizer  # noqa: E402
from microlm.train import read_log  # noqa: E402

SETTINGS = {  # sweep -> setting name -> overrides of the run's preset (the sweep trains STAGE[sweep])
    "sft": {
        "60 tasks/play, 300 steps": {"sft_data": {"tasks_per_play": 60}, "sft": {"max_steps": 300}},
        "200 tasks/play, 400 steps, lr 2e-3": {"sft": {"max_steps": 400, "lr": 2e-3, "min_lr": 2e-4}},
        "200 tasks/play, 600 steps (preset)": {},
        "200 tasks/play, 600 steps, length groups of 64": {"sft": {"length_groups": 64}},
        "200 tasks/play, 600 steps, length groups of 4": {"sft": {"length_groups": 4}},
    },
    "rl": {
        "30 steps, lr 1e-4 (preset)": {},
        "60 steps, lr 1e-4": {"rl_train": {"max_steps": 60}},
        "30 steps, lr 3e-4": {"rl_train": {"lr": 3e-4, "min_lr": 3e-5}},
        "30 steps, temperature 0.5": {"rl": {"temperature": 0.5}},
        "30 steps, groups of 16, 4 prompts": {"rl": {"group_size": 16}, "rl_train": {"batch_size": 4}},
        "30 steps, every group (no drop_flat)": {"rl": {"drop_flat": False}},
    },
    "rl_prompts": {  # RL on SFT's own train prompts, or on new tasks from the training plays (12_rl's `fresh_tasks`)
        "30 steps, SFT's prompts (preset)": {},
        "30 steps, 10 new tasks per play": {"rl": {"fresh_tasks_per_play": 10}},
        "60 steps, 20 new tasks per play": {"rl": {"fresh_tasks_per_play": 20}, "rl_train": {"max_steps": 60}},
    },
    "rl_start": {  # RL from SFT models trained less: a start with more room to grow (each row trains its own SFT)
        "SFT 600 steps (preset)": {},
        "SFT 300 steps": {"sft": {"max_steps": 300}},
        "SFT 150 steps": {"sft": {"max_steps": 150}},
        "SFT 300 steps; RL 60 steps, lr 3e-4": {"sft": {"max_steps": 300},
                                                "rl_train": {"max_steps": 60, "lr": 3e-4, "min_lr": 3e-5}},
        "SFT 300 steps; RL 240 steps, lr 3e-4": {"sft": {"max_steps": 300},
                                                 "rl_train": {"max_steps": 240, "lr": 3e-4, "min_lr": 3e-5,
                                                              "eval_every": 20, "ckpt_every": 20}},
        "SFT 300 steps; RL 240 steps, lr 3e-4, invalid penalty 0.5": {
            "sft": {"max_steps": 300}, "rl": {"invalid_penalty": 0.5},
            "rl_train": {"max_steps": 240, "lr": 3e-4, "min_lr": 3e-5, "eval_every": 20, "ckpt_every": 20}},
        "SFT 300 steps; RL 60 steps, lr 3e-4, invalid penalty 0.5": {
            "sft": {"max_steps": 300}, "rl": {"invalid_penalty": 0.5},
            "rl_train": {"max_steps": 60, "lr": 3e-4, "min_lr": 3e-5}},
        # PPO's epochs: each batch of samples serves 2 optimizer steps (the clip starts to matter), same samples
        "SFT 300 steps; RL 60 batches x 2 updates, lr 3e-4, invalid penalty 0.5": {
            "sft": {"max_steps": 300}, "rl": {"invalid_penalty": 0.5, "updates": 2},
            "rl_train": {"max_steps": 120, "lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 6, "eval_every": 20,
                         "ckpt_every": 20}},
        # the weakest start, the most room: does RL's gain grow with what sampling can reach?
        "SFT 150 steps; RL 120 steps, lr 3e-4, invalid penalty 0.5": {
            "sft": {"max_steps": 150}, "rl": {"invalid_penalty": 0.5},
            "rl_train": {"max_steps": 120, "lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 6, "eval_every": 20,
                         "ckpt_every": 20}},
        # ReMax's baseline: each answer against the policy's greedy answer to its prompt, what the leaderboard scores
        "SFT 600 steps (preset); greedy baseline": {"rl": {"baseline": "greedy"}},
        "SFT 300 steps; RL 60 steps, lr 3e-4, invalid penalty 0.5, greedy baseline": {
            "sft": {"max_steps": 300}, "rl": {"invalid_penalty": 0.5, "baseline": "greedy"},
            "rl_train": {"max_steps": 60, "lr": 3e-4, "min_lr": 3e-5}},
        "SFT 150 steps; RL 120 steps, lr 3e-4, invalid penalty 0.5, greedy baseline": {
            "sft": {"max_steps": 150}, "rl": {"invalid_penalty": 0.5, "baseline": "greedy"},
            "rl_train": {"max_steps": 120, "lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 6, "eval_every": 20,
                         "ckpt_every": 20}},
        # and only the samples that beat the greedy answer teach: rejection-sampling fine-tuning, inside GRPO's loss
        "SFT 600 steps (preset); greedy baseline, positive only": {"rl": {"baseline": "greedy", "positive_only": True}},
        "SFT 150 steps; RL 120 steps, lr 3e-4, invalid penalty 0.5, greedy baseline, positive only": {
            "sft": {"max_steps": 150}, "rl": {"invalid_penalty": 0.5, "baseline": "greedy", "positive_only": True},
            "rl_train": {"max_steps": 120, "lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 6, "eval_every": 20,
                         "ckpt_every": 20}},
    },
    "dpo": {
        "40 steps, beta 0.3 (preset)": {},
        "beta 0.1 (the DPO paper's)": {"dpo": {"beta": 0.1}},
        "beta 1.0": {"dpo": {"beta": 1.0}},
        "20 steps": {"dpo_train": {"max_steps": 20}},
        "the chosen answer's NLL too (RPO, weight 1)": {"dpo": {"sft_weight": 1.0}},
        "the gold answer chosen": {"dpo": {"chosen": "gold"}},
    },
    "names": {
        "half the examples renamed (preset)": {},
        "no names invented": {"sft_data": {"rename_speakers": 0.0}},
        "every example renamed": {"sft_data": {"rename_speakers": 1.0}},
    },
}
STAGE = {"names": "sft", "rl_prompts": "rl", "rl_start": "rl"}  # the stage a sweep trains, where not its own name
CURVE = {"sft": "val_loss", "dpo": "heldout_f1", "rl": "heldout_f1"}  # the log record each row's curve follows
SUMMARY = {"sft": ("val_loss",), "dpo": ("pairs", "loss", "sample_reward"),
           "rl": ("reward_first", "reward_last", "kl", "length")}  # kept from the stage summary
OPTIONAL = ("reward_greedy_first", "reward_greedy_last")  # kept where the stage summary has them (rl.baseline="greedy")
HEADROOM = dict(k=16, temperatures=(0.5, 1.0), seed=0)  # headroom: answers sampled per prompt, at each temperature
KEYS = ("f1", "exact", "parse", "schema_valid")


def untouched(stage: str, overrides: dict) -> list[str]:
    "The stages `stage` starts from that read none of the overridden sections, nor a stage that does."
    moved = set()
    for s in plan(stage)[:-1]:
        if set(get_stage(s).sections) & set(overrides) or set(get_stage(s).deps) & moved:
            moved.add(s)
    return [s for s in plan(stage)[:-1] if s not in moved]


def scratch_run(base: Run, stage: str, name: str, overrides: dict, work: Path) -> Run:
    "The run whose `stage` is `name`'s setting: `base` for no overrides, else a scratch run (kept if current)."
    if not overrides:
        return base
    d = work / name.replace(" ", "_").replace("/", "-").replace(",", "")
    preset = apply_overrides(base.preset, overrides)
    shared = untouched(stage, overrides)  # shared with `base`; the rest are trained in the scratch run
    same = (d / "config.json").exists() and Run(d).preset == preset
    if not (same and all(read_marker(d, s) == read_marker(base, s) for s in shared)):  # new, or the base re-ran one
        run = trial_run(base, d, base.preset.seed, overrides)  # data and tokenizer
        for s in shared:
            for out in get_stage(s).outputs:
                if not (d / out).exists():
                    ignore = shutil.ignore_patterns("ckpt")
                    shutil.copytree(base / out, d / out, copy_function=os.link, ignore=ignore)
            shutil.copy(base / ".stages" / f"{s}.json", d / ".stages" / f"{s}.json")
        for s in shared:
            if not is_current(run, s):
                raise RuntimeError(f"{d}: the shared stage {s!r} is not current there (did the overrides touch it?)")
    return Run(d)


def prompt_sets(base: Run, train: bool = False) -> tuple:
    """The tokenizer, the 120 held-out valid-play and the leaderboard's 120 test-play prompts (`train`: and 120 from
    RL's train pool), the answer budget."""
    tok, L = load_tokenizer(base / "tokenizer"), base.preset.sft.seq_len
    sets = {"valid": heldout_examples(base, 120, L), "test": eval_examples(base)}
    if train:  # and 120 from the pool the RL stage draws its prompts from, in an order fixed by the run's seed
        ex = train_prompts(base, tok)
        random.Random(f"{base.preset.seed}:rl_train").shuffle(ex)
        sets["train"] = ex[:120]
    return tok, sets, base.preset.eval.max_new_tokens


def scores(model, tok, prompts: dict, max_new_tokens: int) -> tuple[dict, dict]:
    "Each prompt set's rates (`valid_f1`, `test_exact`, ...), and its graded answers (`graded_answers`) by set."
    graded = {k: graded_answers(model, tok, ex, max_new_tokens) for k, ex in prompts.items()}
    rates = {k: aggregate([s for _, s in g]) for k, g in graded.items()}
    return {f"{k}_{m}": round(r[m], 4) for k, r in rates.items() for m in KEYS}, graded


def sweep(base: Run, stage: str, settings: dict, work: Path) -> dict:
    ensure(base, stage)
    tok, prompts, n_new = prompt_sets(base)
    shown = [i for i, e in enumerate(prompts["test"]) if e["kind"] == "repair"][:4]  # answers shown beside the gold
    out = dict(stage=stage, run=str(base.root), preset=base.preset.name)
    out["prompts"] = {k: len(v) for k, v in prompts.items()}
    start = get_stage(stage).deps[0] if stage in ("dpo", "rl") else None  # the model the stage starts from
    if start:  # answers the same prompts
        out["start"] = dict(stage=start, **scores(load_model(base / start), tok, prompts, n_new)[0])
        print(json.dumps(out["start"]), flush=True)
    rows = []
    for name, ov in settings.items():
        run, t0 = scratch_run(base, stage, name, ov, work), time.time()
        own_start = {}
        if start and start not in untouched(stage, ov):  # a row that retrains the start scores its own
            ensure(run, start, log=print)
            own_start = {"start": dict(stage=start, **scores(load_model(run / start), tok, prompts, n_new)[0])}
        was_current = is_current(run, stage)
        summary = run_stage(run, stage, log=print, progress=False)
        marker = json.loads((run / ".stages" / f"{stage}.json").read_text())
        model = load_model(run / stage)
        extra = {}
        if stage == "sft":  # the share of padding in its batches
            b = finetune_data(run, tok, run.preset.sft)[1]
            extra["padded_share"] = round(padded_share(b.encoded, b.batch_size, b.groups), 3)
        rates, graded = scores(model, tok, prompts, n_new)
        broken = [(e, a) for e, (a, s) in zip(prompts["test"], graded["test"])  # test answers that break their schema
                  if not s["schema_valid"]]
        rows.append(
            dict(
                setting=name,
                overrides=ov,
                steps=summary["steps"],
                **({"train_examples": summary["examples"]["train"]} if "examples" in summary else {}),
                **{k: summary[k] for k in SUMMARY[stage]}, **{k: summary[k] for k in OPTIONAL if k in summary},
                seconds=marker["seconds"],
                machine=marker.get("machine"),
                reused=was_current,
                **extra,
                **own_start,
                **rates,
                curve=[(r["step"], r[CURVE[stage]]) for r in read_log(run / stage / "log.jsonl") if CURVE[stage] in r],
                answers=[dict(prompt=e["messages"][0]["content"], gold=e["messages"][1]["content"], answer=a)
                         for e, a in ((prompts["test"][i], graded["test"][i][0]) for i in shown)],
                broken=[dict(kind=e["kind"], gold=e["messages"][1]["content"], answer=a) for e, a in broken[:2]],
            )
        )
        print(json.dumps(rows[-1]), f"({time.time() - t0:.0f} s)", flush=True)
    return dict(out, machine=machine(), rows=rows)


def by_kind(kinds: list[str], rows: list, f) -> dict:
    "f(rows) over all prompts and over each task kind's."
    return {"all": f(rows), **{k: f([r for r, kk in zip(rows, kinds) if kk == k]) for k in sorted(set(kinds))}}


def headroom(base: Run, train: bool = False) -> dict:
    "Greedy and best-of-n scores (12_rl's `best_of_n`) of the run's RL start and RL model, on both prompt sets."
    stages = (get_stage("rl").deps[0], "rl")
    for s in stages:
        if read_marker(base, s) is None or not (base / s / "model.safetensors").exists():
            raise SystemExit(f"{base}: no {s!r} model there; run `microlm pipeline --preset {base.preset.name}` first")
    tok, prompts, n_new = prompt_sets(base, train)
    out = dict(run=str(base.root), preset=base.preset.name, **HEADROOM, max_new_tokens=n_new, models={})
    out["prompts"] = {k: dict(collections.Counter(e["kind"] for e in ex)) for k, ex in prompts.items()}
    for s in stages:
        model, t0 = load_model(base / s), time.time()
        rec = out["models"][s] = dict(outputs_digest=read_marker(base, s)["outputs_digest"])
        for k, ex in prompts.items():
            kinds = [e["kind"] for e in ex]
            greedy = answer_scores(model, tok, ex, 1, 0.0, n_new)  # one answer each: its "best of 1"
            rec[k] = {"greedy": by_kind(kinds, greedy, lambda rows: best_of_n(rows)[1])}
            for t in HEADROOM["temperatures"]:
                sc = answer_scores(model, tok, ex, HEADROOM["k"], t, n_new, HEADROOM["seed"])
                rec[k][str(t)] = by_kind(kinds, sc, best_of_n)
            print(s, k, json.dumps({t: v["all"] for t, v in rec[k].items()}), f"({time.time() - t0:.0f} s)", flush=True)
        rec["seconds"] = round(time.time() - t0, 1)
    return dict(out, machine=machine())


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=sorted(SETTINGS) + ["headroom"])
    ap.add_argument("run", type=Path)
    ap.add_argument("--work", type=Path, help="scratch runs (default: runs/STAGE_sweep)")
    ap.add_argument("--out", type=Path, help="the record (default: nbs/results/STAGE_sweep.json)")
    ap.add_argument("--train", action="store_true",
                    help="headroom: 120 prompts from RL's train pool too (where its reward is earned)")
    a = ap.parse_args()
    if a.stage == "headroom":
        res, out = headroom(Run(a.run), a.train), a.out or ROOT / "nbs" / "results" / "rl_headroom.json"
    else:
        work = a.work or ROOT / "runs" / f"{a.stage}_sweep"
        res = sweep(Run(a.run), STAGE.get(a.stage, a.stage), SETTINGS[a.stage], work)
        out = a.out or ROOT / "nbs" / "results" / f"{a.stage}_sweep.json"
    atomic_write(out, res)
    print(f"wrote {out}")
