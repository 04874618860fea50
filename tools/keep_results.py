"""Keep a run's results beside the notebooks: the files the chapters read their `small` tables and plots from.

    .venv/bin/python tools/keep_results.py runs/small            # -> nbs/results/small/

The chapters never retype a number from a long run; they render it from these files. After a new main-job run,
this command refreshes them all at once (and the chapters' saved outputs follow when the notebooks are re-run).
Only results are kept: logs, stage records, leaderboards, verification JSON and the report; no weights, no text.
It refuses a run whose stages are not all current (never run, interrupted, or stale against their inputs), naming
each and why, and then leaves the kept folder as it was: the chapters must never read a half-finished run.
"""
import argparse, glob, shutil, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from microlm.config import Run, atomic_dir  # noqa: E402  (the repository's own package, not an installed one)
from microlm.stages import STAGES, stale_reason  # noqa: E402

PATTERNS = ("config.json", "report.md", ".stages/*.json", "*/log.jsonl", "eval/*.json", "eval/*.md", "eval/scores.csv",
            "verify/*.json", "quant/*.json", "sft/tasks_schemas.txt")


def keep(run: Path, out: Path, stages=tuple(STAGES)) -> list[str]:
    "Copy the result files of `run` into `out` (replaced atomically); `.stages/` becomes `stages/`. The names kept."
    if not (run / "config.json").exists():
        raise SystemExit(f"{run}: not a run folder (no config.json)")
    r, memo = Run(run), {}
    why = {s: w for s in stages if (w := stale_reason(r, s, memo)) is not None}
    if why:
        lines = "".join(f"\n  {s}: {w}" for s, w in why.items())
        raise SystemExit(f"{run}: not kept, {out} left as it was; these stages are not current:{lines}")
    files = sorted({Path(f) for p in PATTERNS for f in glob.glob(str(run / p)) if Path(f).is_file()})
    with atomic_dir(out) as tmp:
        for f in files:
            rel = f.relative_to(run).as_posix().replace(".stages/", "stages/", 1)
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, tmp / rel)
    return [f.relative_to(run).as_posix() for f in files]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--as", dest="name", help="folder name under nbs/results (default: the run folder's name)")
    a = ap.parse_args()
    names = keep(a.run, ROOT / "nbs" / "results" / (a.name or a.run.name))
    print(f"kept {len(names)} files of {a.run} in nbs/results/{a.name or a.run.name}/")
