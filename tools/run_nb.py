"""Run notebooks top to bottom in a fresh Jupyter kernel, as a reader would, and save their outputs.

    .venv/bin/python tools/run_nb.py nbs/01_stages.ipynb [more notebooks] [--keep slow]

Cells flagged with a `--keep` flag (e.g. `#| slow`: long runs, benchmarks) are not run; they keep
the outputs they have. Progress bars are switched off (`TQDM_DISABLE`, the `transformers` and hub
bars, and any bar a library draws regardless is dropped), so saved outputs hold results, not frames.
Run `nbdev-clean` afterwards.
"""
import argparse, os, re, sys, time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

QUIET = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
         "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def flags(cell) -> set[str]:
    "The nbdev flags of a cell's leading `#|` lines (`#| slow` -> {'slow'})."
    out = set()
    for line in cell.source.splitlines():
        if not line.startswith("#|"): break
        out.update(re.findall(r"[\w-]+", line[2:]))
    return out


def is_progress(out) -> bool:
    "A progress-bar frame: a widget view (tqdm in JupyterLab) or a stderr stream of tqdm's text frames."
    if "application/vnd.jupyter.widget-view+json" in out.get("data", {}): return True
    text = "".join(out.get("text", "")) if out.get("name") == "stderr" else ""
    return bool(re.search(r"(it/s|s/it)\]|\|\s*\d+/\d+ \[", text))


def run(path: Path, keep: set[str], timeout: int) -> float:
    "Execute `path` in a fresh kernel (cwd: its folder), keeping the outputs of cells flagged with `keep`."
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    t0 = time.time()
    with client.setup_kernel(env={**os.environ, **QUIET}):
        for i, cell in enumerate(nb.cells):
            f = flags(cell)
            if cell.cell_type != "code" or f & keep or {"eval", "false"} <= f: continue
            client.execute_cell(cell, i)
            cell.outputs = [o for o in cell.outputs if not is_progress(o)]   # bars are for the live reader, not the docs
    nbformat.write(nb, path)
    return time.time() - t0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("--keep", nargs="*", default=["slow", "gpu", "notest"], help="flags whose cells are not run")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    a = ap.parse_args()
    for p in a.notebooks:
        print(f"{p}: {run(p.resolve(), set(a.keep), a.timeout):.0f} s", flush=True)
    sys.exit(0)
