"""The docs site builds offline and has a page for every notebook, with prose, API sections and images."""
import re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def test_docs_site_builds_with_a_page_per_notebook(tmp_path):
    out = tmp_path/"site"
    r = subprocess.run([sys.executable, "tools/docs.py", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    nbs = sorted(p.stem for p in (ROOT/"nbs").glob("*.ipynb") if not p.name.startswith("_"))
    pages = {p.stem for p in out.glob("*.html")}
    assert set(nbs) <= pages, f"notebooks without a page: {sorted(set(nbs) - pages)}"
    index = (out/"index.html").read_text()
    # the sidebar lists the stages in pipeline order
    order = re.findall(r'href="(?:\./)?(\d\d[a-z]?_\w+)\.html"', index)
    seen = list(dict.fromkeys(order))
    numbered = [n for n in nbs if re.match(r"\d\d", n)]
    assert seen == sorted(seen) and len(seen) >= len(numbered), seen
    cfg = (out/"00_config.html").read_text()
    assert "Presets" in cfg and 'id="run"' in cfg          # prose and a show_doc API section
    for nb in nbs:                                           # every saved plot made it into its page
        html = (out/f"{nb}.html").read_text()
        n_png = (ROOT/"nbs"/f"{nb}.ipynb").read_text().count('"image/png"')
        assert html.count("<img") >= n_png, f"{nb}: {n_png} saved plots but fewer images in the page"

def test_readme_is_generated_from_index(tmp_path):
    committed = (ROOT/"README.md").read_text()
    r = subprocess.run([sys.executable, "tools/docs.py", "--readme"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    readme = (ROOT/"README.md").read_text()
    assert readme == committed, "README.md differs from index.ipynb: run tools/docs.py --readme and commit it"
    assert "bash tools/setup.sh && .venv/bin/python -m pytest" in readme
    assert "bash tools/setup.sh && .venv/bin/microlm pipeline" in readme
    ci = (ROOT/".ci/run").read_text()
    assert "bash tools/setup.sh && .venv/bin/python -m pytest" in ci
