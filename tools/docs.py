"""Build the microlm docs site into docs/ offline, and README.md from nbs/index.ipynb.

    python tools/docs.py            # site -> docs/
    python tools/docs.py --readme   # README.md only (fast)

Where Quarto is installed this is `nbdev-docs`; without it (Quarto downloads its own binary, which
the build machines cannot) nbdev still processes the notebooks (`proc_nbs`: show_doc API sections,
directives, saved outputs) and the pure-Python `smalldocs` renders nbdev's `_quarto.yml`.
"""
import argparse, os, re, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def readme():
    "README.md = the processed index notebook as Markdown (what `nbdev-readme` does with Quarto)."
    import nbformat
    from nbconvert import MarkdownExporter
    nb = nbformat.read(ROOT/"nbs/index.ipynb", as_version=4)
    keep = []
    for c in nb.cells:
        src = c.source.lstrip()
        if c.cell_type == "code" and (src.startswith("#| hide") or src.startswith("#|hide")): continue
        keep.append(c)
    nb.cells = keep
    body, _ = MarkdownExporter(exclude_output_prompt=True, exclude_input_prompt=True).from_notebook_node(nb)
    lines = body.splitlines()
    # the notebook's "> summary" line follows the title, as nbdev-readme renders it
    text = "\n".join(lines).strip() + "\n"
    text = re.sub(r"\]\((\w+)\.html\)", r"](nbs/\1.ipynb)", text)  # site pages -> notebooks on the repo
    (ROOT/"README.md").write_text("<!-- generated from nbs/index.ipynb by tools/docs.py --readme; do not edit -->\n\n" + text)
    return ROOT/"README.md"

def _docs_cells_only():
    """Make nbdev's docs processor run only what API docs need.

    While rendering, nbdev executes every cell that *contains* an import (its FAQ asks notebooks never
    to mix imports with other code). Our example cells import what they use, and running them here
    would retrain models just to render a page whose outputs are already saved in the notebook. So
    only exported cells, `show_doc` cells and cells made of nothing but imports are executed."""
    import ast
    import nbdev.processors as P
    nbdev_rule = P._do_eval
    def docs_rule(cell):
        if not nbdev_rule(cell): return False
        if cell.directives_.keys() & {"export", "exports", "exporti", "exec_doc"}: return True
        trees = cell.parsed_()
        return bool(P._show_docs(trees)) or all(isinstance(t, (ast.Import, ast.ImportFrom)) for t in trees)
    P._do_eval = docs_rule

def site(out: Path):
    "Process the notebooks with nbdev and render them into `out`."
    os.chdir(ROOT)
    if shutil.which("quarto"):
        subprocess.run([str(Path(sys.executable).parent/"nbdev-docs")], check=True); return ROOT/"docs"
    from nbdev.quarto import refresh_quarto_yml, nbdev_sidebar
    from nbdev.serve import proc_nbs
    from nbdev.doclinks import _build_modidx
    _docs_cells_only()
    refresh_quarto_yml()
    _build_modidx()
    nbdev_sidebar.__wrapped__(path=ROOT/"nbs", force=True)
    cache = Path(proc_nbs(str(ROOT/"nbs"), n_workers=0, force=True))
    r = subprocess.run([str(Path(sys.executable).parent/"smalldocs"), "render", "--quiet", str(cache)],
                       capture_output=True, text=True)
    if r.returncode: sys.exit(f"smalldocs render failed:\n{r.stdout}\n{r.stderr}")
    built = cache/"docs"
    if not built.exists(): sys.exit(f"smalldocs wrote no site at {built}:\n{r.stdout}\n{r.stderr}")
    if out.exists(): shutil.rmtree(out)
    shutil.move(str(built), str(out))
    return out

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readme", action="store_true", help="only regenerate README.md")
    ap.add_argument("--out", default=str(ROOT/"docs"), help="site folder (default docs/)")
    a = ap.parse_args()
    print(readme())
    if not a.readme: print(site(Path(a.out).absolute()))
