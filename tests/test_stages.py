"""The stage registry through the `microlm` command: a local corpus whose files change, stage folders that
disappear, configs edited by hand. A stage is current only while its config, its inputs and its outputs match."""
import json, shutil, subprocess, sys
from pathlib import Path

import pytest

from microlm.config import SMOKE, Run
from microlm.stages import STAGES, execute, is_current, plan, read_marker, stale_reason

MICROLM = Path(sys.executable).parent/"microlm"   # the console script the set-up installs


def microlm(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(MICROLM), *map(str, args)], capture_output=True, text=True, timeout=600)


def write_doc(corpus: Path, i: int, tag: str = "w"):
    "One document of ~3000 characters (over smoke's min_chars) with words of its own."
    (corpus/f"doc{i}.txt").write_text(f"Document {i}.\n" + " ".join(f"{tag}{i}_{j}" for j in range(400)) + "\n")


def status(run: Path) -> dict[str, str]:
    "`microlm status` as {stage: the rest of its line}."
    r = microlm("status", "--run", run)
    assert r.returncode == 0, r.stderr
    return {l.split()[0]: l.split(maxsplit=1)[1] for l in r.stdout.splitlines()[1:]}


@pytest.fixture
def corpus(tmp_path) -> Path:
    c = tmp_path/"corpus"
    c.mkdir()
    for i in range(5): write_doc(c, i)
    return c


@pytest.fixture
def made(tmp_path, corpus) -> Path:
    "A run whose data and tokenizer stages have run from the local corpus."
    run = tmp_path/"run"
    r = microlm("tokenizer", "--preset", "smoke", "--run", run, "--source", corpus)
    assert r.returncode == 0, r.stderr
    assert "[1/2] data: running (never run)" in r.stdout and "[2/2] tokenizer: running (never run)" in r.stdout
    return run


def test_source_is_kept_in_the_run(made, corpus):
    assert json.loads((made/"config.json").read_text())["data"]["source"] == str(corpus)
    st = status(made)
    assert st["data"].startswith("current") and st["tokenizer"].startswith("current") and st["pretrain"] == "not run"
    r = microlm("tokenizer", "--run", made)               # nothing changed: both skipped
    assert "[1/2] data: up to date" in r.stdout and "[2/2] tokenizer: up to date" in r.stdout


@pytest.mark.parametrize("change, words", [("edit", "changed doc1.txt"), ("add", "added doc7.txt"),
                                           ("remove", "missing doc2.txt")])
def test_corpus_change_reruns_data_and_below(made, corpus, change, words):
    before = (made/"data/train.txt").read_text() + (made/"data/valid.txt").read_text() + (made/"data/test.txt").read_text()
    tokens_before = (made/"tokens/train.bin").read_bytes()
    if change == "edit": write_doc(corpus, 1, tag="edited")
    if change == "add": write_doc(corpus, 7)
    if change == "remove": (corpus/"doc2.txt").unlink()
    st = status(made)
    assert st["data"] == f"stale    input changed: data.source: {words}"
    assert st["tokenizer"].startswith("stale    upstream stage data is not current (input changed")
    r = microlm("data", "--run", made)                    # the data stage alone
    assert r.returncode == 0 and f"[1/1] data: running (input changed: data.source: {words})" in r.stdout, r.stdout
    after = (made/"data/train.txt").read_text() + (made/"data/valid.txt").read_text() + (made/"data/test.txt").read_text()
    assert after != before
    assert status(made)["tokenizer"] == "stale    input changed: data made new outputs"
    r = microlm("tokenizer", "--run", made)               # like make: data is current now, the tokenizer re-runs
    assert "[1/2] data: up to date" in r.stdout and "[2/2] tokenizer: running (input changed: data made new outputs)" in r.stdout
    assert (made/"tokens/train.bin").read_bytes() != tokens_before
    assert all(v.startswith("current") for k, v in status(made).items() if k in ("data", "tokenizer"))


def test_touching_a_file_changes_nothing(made, corpus):
    (corpus/"doc0.txt").write_text((corpus/"doc0.txt").read_text())   # new mtime, same content
    assert status(made)["data"].startswith("current")


def test_deleted_stage_folder_is_not_current(made):
    shutil.rmtree(made/"tokens")
    assert status(made)["tokenizer"].startswith("stale    output changed: missing tokens/meta.json")
    r = microlm("tokenizer", "--run", made)
    assert "[2/2] tokenizer: running (output changed: missing tokens/meta.json" in r.stdout
    assert (made/"tokens/train.bin").exists() and status(made)["tokenizer"].startswith("current")
    shutil.rmtree(made/"data")
    st = status(made)
    assert st["data"].startswith("stale    output changed: missing data/lengths.png")
    assert st["tokenizer"].startswith("stale    upstream stage data is not current")


def test_edited_config_names_its_section(made):
    cfg = json.loads((made/"config.json").read_text())
    cfg["tokenizer"]["vocab_size"] = 512
    (made/"config.json").write_text(json.dumps(cfg))
    st = status(made)
    assert st["data"].startswith("current") and st["tokenizer"] == "stale    config changed: tokenizer"


def test_bad_source_is_a_clear_error(tmp_path):
    r = microlm("data", "--preset", "smoke", "--run", tmp_path/"run", "--source", tmp_path/"nowhere")
    assert r.returncode == 2 and "no such file or folder" in r.stderr and "nowhere" in r.stderr
    assert not (tmp_path/"run").exists()


def test_interrupted_and_incomplete(tmp_path):
    run = Run(tmp_path, SMOKE)
    def crash(run, force=False): raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt): execute(run, "data", crash)
    assert stale_reason(run, "data") == "interrupted: started, never finished"
    def paused(run, force=False): return dict(steps=3, incomplete="time budget")
    assert execute(run, "data", paused)["incomplete"] == "time budget"
    assert read_marker(run, "data") is None and stale_reason(run, "data") == "paused: time budget"
    def body(run, force=False):
        (run/"data").mkdir(exist_ok=True)
        (run/"data/train.txt").write_text("x")
        return dict(docs=1)
    lines = []
    execute(run, "data", body, log=lines.append)
    assert lines[0] == "data: running (paused: time budget)" and is_current(run, "data")
    assert not (run/".stages/data.running").exists() and read_marker(run, "data")["summary"] == {"docs": 1}


def test_code_versions_make_a_stage_stale(tmp_path, monkeypatch):
    "A stage that names a behaviour of microlm's code is out of date when that behaviour's version moves."
    import microlm.stages as st
    run = Run(tmp_path, SMOKE)
    def body(run, force=False):
        (run/"dpo").mkdir(exist_ok=True)
        (run/"dpo/pairs.json").write_text("[]")
        return dict(pairs=0)
    execute(run, "dpo", body)                            # recorded with today's versions
    assert read_marker(run, "dpo")["code"] == {"decoding": st.CODE_VERSIONS["decoding"]}
    assert stale_reason(run, "dpo").startswith("upstream stage sft")   # past the code check: the next question
    monkeypatch.setitem(st.CODE_VERSIONS, "decoding", st.CODE_VERSIONS["decoding"] + 1)
    v = st.CODE_VERSIONS["decoding"]
    assert stale_reason(run, "dpo") == f"code changed: decoding {v - 1} -> {v}"
    assert "code" not in st.fingerprint(run, "data") and st.fingerprint(run, "dpo")["code"] == {"decoding": v}
    assert st.stage_key(run, "dpo") != read_marker(run, "dpo")["key"]  # checkpoints of the old version do not resume


def test_registry_is_the_graph():
    assert list(STAGES)[0] == "data" and plan("verify")[-1] == "verify"
    for s in STAGES.values():                            # every dependency comes earlier in pipeline order
        assert all(list(STAGES).index(d) < list(STAGES).index(s.name) for d in s.deps), s.name
    r = microlm("--help")
    listed = {l.split()[0] for l in r.stdout.splitlines() if l.startswith("    ") and l.split()}
    assert r.returncode == 0 and set(STAGES) <= listed, r.stdout


def test_keep_results_refuses_a_run_not_current(smoke_run, tmp_path):
    "tools/keep_results.py keeps a run's results only when every stage asked for is current; else the kept folder stays."
    import importlib.util
    spec = importlib.util.spec_from_file_location("keep_results", Path(__file__).parents[1]/"tools"/"keep_results.py")
    kr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kr)
    out = tmp_path/"kept"
    out.mkdir()
    (out/"old.txt").write_text("the results kept before")
    with pytest.raises(SystemExit, match=r"not current:\n(.|\n)*  eval: never run") as e:
        kr.keep(smoke_run.root, out)        # the session's smoke run stops at export
    assert "export" not in str(e.value).split("not current:")[1], str(e.value)
    assert (out/"old.txt").read_text() == "the results kept before" and len(list(out.iterdir())) == 1
    names = kr.keep(smoke_run.root, out, stages=plan("export"))
    assert "config.json" in names and ".stages/rl.json" in names and "rl/log.jsonl" in names
    assert (out/"stages"/"export.json").exists() and not (out/"old.txt").exists()
    with pytest.raises(SystemExit, match="not a run folder"):
        kr.keep(tmp_path/"nowhere", out)
    assert (out/"stages"/"export.json").exists()
