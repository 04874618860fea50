"""One test per notebook: each runs through `nbdev.test` in its own process, honouring the test flags
(`tst_flags` in pyproject.toml: notest, slow, gpu), so a failure names the notebook."""
import subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT/"nbs").glob("*.ipynb") if not p.name.startswith("_"))

def test_every_notebook_is_collected():
    assert [p.name for p in NOTEBOOKS][:1] == ["00_config.ipynb"] and (ROOT/"nbs/index.ipynb") in NOTEBOOKS

@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook(nb):
    # A fresh process per notebook: nothing one notebook imports or sets leaks into the next.
    code = ("import sys; from nbdev.test import test_nb; from nbdev.config import get_config; "
            f"ok, t = test_nb({str(nb)!r}, skip_flags=get_config().tst_flags.split()); "
            "print(f'{t:.1f}s'); sys.exit(0 if ok else 1)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT/"nbs", capture_output=True, text=True)
    assert r.returncode == 0, f"{nb.name} failed:\n{r.stderr[-6000:]}\n{r.stdout[-2000:]}"
