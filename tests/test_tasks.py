"Invariants and bad input for microlm.tasks: play parsing, task golds, schema checks."
import json, random, re
from dataclasses import replace

import jsonschema
import pytest

from microlm.config import Run
from microlm.tasks import (KINDS, SCHEMAS, _corrupt, make_task, moves, numeral, parse_play, play_tasks,
                           rename_speakers, schema_errors, schema_valid, split_tasks)

def test_numeral_and_parse(play):
    assert [numeral(s) for s in ("XIV", "2", "THIRD", "Who")] == [14, 2, 3, None]
    blocks = parse_play(play)
    sp = [(b["speaker"], b["act"], b["scene"]) for b in blocks if b["type"] == "speech"]
    assert sp == [("Ber", 1, 1), ("Fran", 1, 1), ("Ber", 1, 1), ("Hor", 1, 1), ("Mar", 1, 1), ("MIRANDA", 2, 1), ("PROSPERO", 2, 1)]
    assert [b for b in blocks if b["type"] == "speech"][-1]["lines"] == ["Be collected:", "No more amazement."]

def test_moves():
    assert moves("[Enter KING, QUEEN, and Attendants.]") == (["KING", "QUEEN", "Attendants"], [])
    assert moves("[Exit.]", "Mar") == ([], ["Mar"]) and moves("[Exeunt.]") == ([], ["all"])
    assert moves("[Exeunt all but Hamlet.]") == ([], [])

@pytest.mark.parametrize("seed", range(20))
def test_every_corruption_breaks_the_schema(seed):
    gold = {"speaker": "Pol", "act": 2, "scene": 1, "words": 7}
    broken, how = _corrupt(gold, random.Random(seed))
    try: obj = json.loads(broken)
    except json.JSONDecodeError: assert how in ("quote", "brace"); return
    assert not schema_valid(obj, SCHEMAS["repair"]), (how, broken)

def test_schema_valid_agrees_with_jsonschema():
    objs = [{"speaker": "A", "first_word": "B", "line_count": 2}, {"speaker": "A", "first_word": "B", "line_count": True},
            {"speaker": "A", "first_word": "B"}, {"speaker": "A", "first_word": "B", "line_count": 1, "x": 1},
            {"lines": [{"speaker": "A", "text": "t"}]}, {"lines": [{"speaker": 1, "text": "t"}]}, [], "x"]
    for o in objs:
        for k, s in SCHEMAS.items():
            assert schema_valid(o, s) == jsonschema.Draft202012Validator(s).is_valid(o), (o, k, schema_errors(o, s))

def test_tasks_are_deterministic_valid_and_fit(play):
    fits = lambda m: len(m[0]["content"]) + len(m[1]["content"]) <= 260
    a, da = play_tasks("p", play, 12, seed=1, fits=fits)
    b, _ = play_tasks("p", play, 12, seed=1, fits=fits)
    assert a == b and len(a) == 12 and {e["kind"] for e in a} == set(KINDS)
    for e in a:
        assert fits(e["messages"]) and schema_valid(e["gold"], e["schema"]) and json.loads(e["messages"][1]["content"]) == e["gold"]
        if e["kind"] == "format":   # the gold is computed from the text shown
            shown = e["messages"][0]["content"].split("\n")
            assert e["gold"]["line_count"] == len(shown) - 2 and shown[2].startswith(e["gold"]["first_word"])
    assert make_task("extract", parse_play(play), random.Random(0), fits=lambda m: False) is None


def test_heldout_tasks_stay_put_when_training_tasks_grow(smoke_run):
    "More training tasks per play leave the valid/test prompts (what every leaderboard measures) as they were."
    cfg = smoke_run.preset.sft_data
    grown = Run(smoke_run.root, replace(smoke_run.preset, sft_data=replace(
        cfg, tasks_per_play=3 * cfg.tasks_per_play, heldout_tasks_per_play=cfg.tasks_per_play)))
    ids = lambda run, split: [e["id"] for e in split_tasks(run, split)[0]]
    for split in ("valid", "test"):
        assert ids(grown, split) == ids(smoke_run, split)
    plays = split_tasks(smoke_run, "train")[1]["plays"]
    assert len(ids(grown, "train")) > len(ids(smoke_run, "train")) >= plays  # the training set did grow


def test_renamed_tasks_are_consistent(play):
    "A renamed example keeps its kind, passage and counts, names no real speaker, and its gold is read from its prompt."
    speakers = {b["speaker"] for b in parse_play(play) if b["type"] == "speech"}
    plain, _ = play_tasks("p", play, 24, seed=3)
    renamed, _ = play_tasks("p", play, 24, seed=3, rename=1.0)
    assert [e["id"] for e in renamed] == [e["id"] for e in plain]
    for a, b in zip(plain, renamed):
        named = lambda text: [s for s in speakers if re.search(rf"(?<![\w']){re.escape(s)}(?![\w'])", text)]
        assert named(a["messages"][0]["content"]), a["id"]  # every kind shows at least one speaker in this play
        pb, gb = b["messages"][0]["content"], b["gold"]
        assert not named(pb) and not named(b["messages"][1]["content"]), (pb, gb)
        assert schema_valid(gb, b["schema"]) and json.loads(b["messages"][1]["content"]) == gb
        assert gb != a["gold"] and {k: v for k, v in gb.items() if not isinstance(v, (str, list))} == {
            k: v for k, v in a["gold"].items() if not isinstance(v, (str, list))}  # act, scene, counts stay
        names = gb.get("speakers") or [gb.get("speaker")] + [l["speaker"] for l in gb.get("lines", [])]
        assert all(n in pb for n in names if n), (names, pb)
    half, _ = play_tasks("p", play, 24, seed=3, rename=0.5)
    assert 0 < sum(h != p for h, p in zip(half, plain)) < len(plain)


def test_only_training_tasks_are_renamed(smoke_run):
    "`sft_data.rename_speakers` renames a share of the training examples; the held-out prompts keep their names."
    cfg = smoke_run.preset.sft_data
    assert cfg.rename_speakers > 0
    plain = Run(smoke_run.root, replace(smoke_run.preset, sft_data=replace(cfg, rename_speakers=0.0)))
    for split in ("valid", "test"):
        assert split_tasks(plain, split) == split_tasks(smoke_run, split)
    a, b = split_tasks(plain, "train")[0], split_tasks(smoke_run, "train")[0]
    changed = sum(x != y for x, y in zip(a, b)) / len(a)
    assert [e["id"] for e in a] == [e["id"] for e in b] and 0.25 < changed <= cfg.rename_speakers + 0.2, changed


def test_rename_speakers_maps_each_name_once():
    p, g = rename_speakers("KING.\nHo!\nQUEEN.\nAy.\nKING.\nGo.", {"speakers": ["KING", "QUEEN"]}, ["KING", "QUEEN"],
                           random.Random(0))
    k, q = g["speakers"]
    assert k != q and p == f"{k}.\nHo!\n{q}.\nAy.\n{k}.\nGo."


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_rename_share_out_of_range(share):
    from microlm.config import SFTDataConfig
    with pytest.raises(ValueError, match=r"rename_speakers must be a share in \[0, 1\], got"):
        SFTDataConfig(rename_speakers=share)
