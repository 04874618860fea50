"""One test per notebook: each runs through `nbdev.test` in its own process, honouring the test flags
(`tst_flags` in pyproject.toml: notest, slow, gpu), so a failure names the notebook. Each gets an empty temporary
folder of its own (TMPDIR), so no notebook can lean on what another left behind. And the saved outputs, which the
docs site shows, hold results: no progress-bar frames, no warnings."""
import json, os, re, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "nbs").glob("*.ipynb") if not p.name.startswith("_"))


def test_every_notebook_is_collected():
    assert [p.name for p in NOTEBOOKS][:1] == ["00_config.ipynb"] and (ROOT / "nbs/index.ipynb") in NOTEBOOKS


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook(nb, tmp_path):
    # A fresh process per notebook: nothing one notebook imports or sets leaks into the next.
    code = ("import sys; from nbdev.test import test_nb; from nbdev.config import get_config; "
            f"ok, t = test_nb({str(nb)!r}, skip_flags=get_config().tst_flags.split()); "
            "print(f'{t:.1f}s'); sys.exit(0 if ok else 1)")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "nbs", capture_output=True, text=True, env=env)
    # nbdev's report of the failing cell, which later noise on stderr (warnings at exit) must not push out of view
    report = re.search(r"^\w+ in \S+\.ipynb:\n.*?(?=\n\n\n|\Z)", r.stderr, re.S | re.M)
    where = report.group(0)[-4000:] if report else ""
    assert r.returncode == 0, f"{nb.name} failed:\n{where}\n...\n{r.stderr[-3000:]}\n{r.stdout[-2000:]}"


PROGRESS = re.compile(r"(it/s|s/it)\]|\|\s*\d+/\d+ \[")
WARNING = re.compile(r"\b\w*Warning\b|\bWARNING\b")


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_saved_outputs_are_clean(nb):
    bad = []
    for i, cell in enumerate(json.loads(nb.read_text())["cells"]):
        for out in cell.get("outputs", []):
            if "application/vnd.jupyter.widget-view+json" in out.get("data", {}):
                bad.append(f"cell {i}: a progress widget")
            text = "".join(out.get("text", ""))
            if PROGRESS.search(text):
                bad.append(f"cell {i}: a progress-bar frame: {PROGRESS.search(text).group(0)!r}")
            if out.get("name") == "stderr" and WARNING.search(text):
                bad.append(f"cell {i}: a warning: {text.strip()[:120]!r}")
    assert not bad, f"{nb.name}: " + "; ".join(bad)
