"Invariants and bad input of the tokenizer stage (microlm.tokenizer)."
import json, random
from dataclasses import replace

import numpy as np
import pytest
from transformers import AutoTokenizer

from microlm.config import SMOKE, Run
from microlm.data import EOT, data_stage
from microlm.tokenizer import (CHAT_TEMPLATE, EOT_ID, IM_END_ID, IM_START_ID, PAD_ID, SPECIAL_TOKENS, SPLITS, STOP_TOKENS,
                               check_chat_template, decode, encode, encode_docs, load_tokenizer, load_tokens, save_tokenizer,
                               to_hf, token_dtype, tokenizer_stage, train_bpe)
from microlm.stages import read_marker

ADVERSARIAL = ["", " ", " leading space", "trailing space ", "👩🏽‍🚀 👨‍👩‍👧‍👦 🇬🇧 🏳️‍🌈", "日本語のテキストと中文、한국어",
               "e\u0301 vs \u00e9, A\u030a vs \u00c5, \u0915\u094d\u0937", "שלום עולם, مرحبا بالعالم \u202eRTL\u202c",
               "\x00\x01\x1b[31m\x7f\t\r\n\r\x0b\x0c", " " * 500 + "x" + "\n" * 60 + "\t" * 9, "\ufeffBOM\u200b\u00a0nbsp",
               "To be, or not<|endoftext|>to be", "<|im_start|>user\nhi<|im_end|>\n<|pad|>", "<|endoftext|", "<|nope|>",
               "\U0010ffff\U0001f600\uffff\ufffd", "a , b . c ! d ? it 's is n't I 'm we 've"]  # the last: what clean-up would undo
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Who is Hamlet?"},
        {"role": "assistant", "content": "The Prince of Denmark."}, {"role": "user", "content": "And Ophelia?"},
        {"role": "assistant", "content": " Polonius' daughter.\n"}]


def preset(**tok):
    "The smoke preset on 8 documents (a fast data stage), with some tokenizer settings changed."
    return replace(SMOKE, data=replace(SMOKE.data, max_docs=8), tokenizer=replace(SMOKE.tokenizer, **tok))

@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    "A run whose data and tokenizer stages have run (smoke vocabulary 1024, 8 plays)."
    run = Run(tmp_path_factory.mktemp("tok"), preset())
    data_stage(run)
    return run, tokenizer_stage(run)

@pytest.fixture(scope="module")
def tok(staged): return load_tokenizer((staged[0]/"tokenizer")).backend_tokenizer

@pytest.fixture(scope="module")
def hf(staged): return AutoTokenizer.from_pretrained(str((staged[0]/"tokenizer")))


# ---- training and bad input ----

def test_special_ids_and_vocab(tok, staged):
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [EOT_ID, IM_START_ID, IM_END_ID, PAD_ID] == [0, 1, 2, 3]
    assert tok.get_vocab_size() == staged[0].preset.tokenizer.vocab_size == 1024
    assert staged[1]["vocab_size"] == 1024

@pytest.mark.parametrize("V", [0, 100, 256, 259])
def test_vocab_too_small(V):
    with pytest.raises(ValueError, match=r"vocab_size=\d+ is too small.*at least 260"): train_bpe("some text " * 50, V)

@pytest.mark.parametrize("text", ["", EOT, EOT * 3, [], ["", ""]])
def test_empty_training_text(text):
    with pytest.raises(ValueError, match="empty"): train_bpe(text, 512)

@pytest.mark.filterwarnings("ignore:train_bpe")
def test_min_frequency_is_used():
    text = "abcdefgh " * 3 + "xy " * 5
    assert "xy" in train_bpe(text, 600, min_frequency=5).get_vocab()
    assert "xy" not in train_bpe(text, 600, min_frequency=6).get_vocab()

@pytest.mark.filterwarnings("ignore:train_bpe")
def test_train_bpe_splits_at_separator():
    tok = train_bpe(EOT.join(["ab"] * 40), 600)  # "b<|endoftext|>a" never occurs inside a document
    assert not any("<|" in t or "|>" in t for t in tok.get_vocab() if t not in SPECIAL_TOKENS)

def test_too_little_text_warns():
    with pytest.warns(UserWarning, match="supports only"): tok = train_bpe("ab ab ab", 1024)
    assert tok.get_vocab_size() < 1024


# ---- losslessness ----

@pytest.mark.parametrize("s", ADVERSARIAL)
def test_roundtrip_adversarial(tok, hf, s):
    assert decode(tok, encode(tok, s)) == s
    assert hf.decode(hf.encode(s), skip_special_tokens=False) == s  # the HF wrapper adds nothing and cleans nothing up

def test_roundtrip_random_unicode(tok):
    rng = random.Random(0)
    def char():
        c = rng.choice([rng.randrange(0, 0x80), rng.randrange(0x80, 0x800), rng.randrange(0x800, 0x10000), rng.randrange(0x10000, 0x110000)])
        return chr(c) if not 0xD800 <= c < 0xE000 else " "  # lone surrogates are not encodable text
    for _ in range(200):
        s = "".join(char() for _ in range(rng.randrange(0, 40)))
        assert decode(tok, encode(tok, s)) == s

def test_roundtrip_whole_valid_split(tok, staged):
    text = ((staged[0]/"data")/"valid.txt").read_text()
    ids = encode(tok, text)
    assert decode(tok, ids) == text
    assert ids.count(EOT_ID) == text.count(EOT)

def test_encode_decode_accept_hf_tokenizer(tok, hf):
    s = "Exeunt, pursued by a bear. 🐻"
    assert encode(hf, s) == encode(tok, s) and decode(hf, encode(tok, s)) == s

def test_specials_in_text_are_single_ids(tok):
    for i, t in enumerate(SPECIAL_TOKENS): assert encode(tok, f"a{t}b")[1:-1] == [i]
    assert EOT_ID not in encode(tok, "<|endoftext|")  # a near miss is ordinary text

def test_decode_mid_character(tok, hf):
    ids = encode(tok, "日本")
    assert len(ids) > 2
    outs = [decode(tok, ids[:cut]) for cut in range(1, len(ids))]
    assert all(o in ("日", "") or "\ufffd" in o for o in outs) and sum("\ufffd" in o for o in outs) >= 2
    assert [hf.decode(ids[:cut]) for cut in range(1, len(ids))] == outs
    assert decode(tok, ids) == "日本"

def test_encode_docs_equals_encode(tok, staged):
    text = ((staged[0]/"data")/"test.txt").read_text()[:200_000] + EOT + " tail" + EOT
    ids = encode_docs(tok, text, np.uint16)
    assert ids.dtype == np.uint16 and ids.tolist() == encode(tok, text)


# ---- Hugging Face files and the chat template ----

def test_autotokenizer_loads(staged, hf):
    files = {p.name for p in (staged[0]/"tokenizer").iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json"} <= files
    assert (hf.eos_token, hf.pad_token, hf.bos_token, hf.unk_token) == ("<|im_end|>", "<|pad|>", None, None)
    assert json.loads(((staged[0]/"tokenizer")/"tokenizer_config.json").read_text())["clean_up_tokenization_spaces"] is False
    assert hf("To be")["input_ids"] == encode(load_tokenizer((staged[0]/"tokenizer")).backend_tokenizer, "To be")

def test_chat_template_renders(hf):
    assert hf.apply_chat_template(CHAT[:3], tokenize=False) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWho is Hamlet?<|im_end|>\n"
        "<|im_start|>assistant\nThe Prince of Denmark.<|im_end|>\n")
    assert hf.apply_chat_template(CHAT[1:2], tokenize=False, add_generation_prompt=True) == \
        "<|im_start|>user\nWho is Hamlet?<|im_end|>\n<|im_start|>assistant\n"  # no default system prompt
    ids = hf.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"]
    assert ids.count(IM_START_ID) == 5 and ids.count(IM_END_ID) == 5

def test_assistant_mask(hf):
    enc = hf.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert len(ids) == len(mask)
    assert hf.decode([i for i, m in zip(ids, mask) if m]) == "The Prince of Denmark.<|im_end|> Polonius' daughter.\n<|im_end|>"

def test_stop_tokens_are_the_turn_and_document_ends(hf):
    from microlm.generate import default_stop_ids
    assert set(STOP_TOKENS) == {"<|im_end|>", "<|endoftext|>"}
    assert default_stop_ids(hf) == [IM_END_ID, EOT_ID]

def test_template_with_unknown_special_token(tok, tmp_path):
    bad = CHAT_TEMPLATE.replace("<|im_end|>", "<|eot_id|>")
    with pytest.raises(ValueError, match=r"<\|eot_id\|>.*does not define"): check_chat_template(bad)
    with pytest.raises(ValueError, match=r"<\|eot_id\|>"): to_hf(tok, chat_template=bad)
    save_tokenizer(to_hf(tok), tmp_path/"t")
    tpl = [p for p in (tmp_path/"t").iterdir() if p.name == "chat_template.jinja"]
    if tpl: tpl[0].write_text(bad)
    else:
        cfg = json.loads((tmp_path/"t"/"tokenizer_config.json").read_text()); cfg["chat_template"] = bad
        (tmp_path/"t"/"tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"<\|eot_id\|>"): load_tokenizer(tmp_path/"t")

def test_template_syntax_error(tok):
    with pytest.raises(Exception, match="(?i)endfor|syntax|template"): to_hf(tok, chat_template="{% for m in messages %}")

def test_load_tokenizer_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"): load_tokenizer(tmp_path/"nowhere")
    (tmp_path/"empty").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"): load_tokenizer(tmp_path/"empty")


# ---- token memmaps and the stage ----

def test_token_dtype():
    assert token_dtype(1024) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32

def test_bins_decode_to_txt(staged, tok):
    run, summary = staged
    meta = json.loads((run/"tokens"/"meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 1024
    for s in SPLITS:
        ids = load_tokens(run, s)
        text = (run/"data"/f"{s}.txt").read_text()
        assert isinstance(ids, np.memmap) and ids.dtype == np.uint16 and len(ids) == meta["tokens"][s] == summary["tokens"][s]
        assert decode(tok, ids) == text  # byte for byte
        assert abs(meta["bytes_per_token"][s] - len(text.encode()) / len(ids)) < 1e-3
        assert int(ids.max()) < 1024
    assert 2.0 < meta["bytes_per_token"]["valid"] < 4.0  # a 1k byte-level BPE on English verse

def test_stage_up_to_date_is_noop(staged, capsys):
    run, summary = staged
    before = {p: p.stat().st_mtime_ns for d in (run/"tokenizer", run/"tokens") for p in d.iterdir()}
    assert tokenizer_stage(run) == summary
    assert "up to date" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for d in (run/"tokenizer", run/"tokens") for p in d.iterdir()}

def test_meta_mismatch_detected(staged):
    run, _ = staged
    mpath = run/"tokens"/"meta.json"; good = mpath.read_text(); meta = json.loads(good)
    try:
        mpath.write_text(json.dumps({**meta, "vocab_size": 1023}))
        with pytest.raises(ValueError, match=r"vocab_size=1023.*1024"): load_tokens(run, "valid")
        mpath.write_text(json.dumps({**meta, "tokenizer_sha256": "ab" * 32}))
        with pytest.raises(ValueError, match=r"sha256 abababababab.*sha256 " + meta["tokenizer_sha256"][:12]): load_tokens(run, "valid")
        mpath.write_text(json.dumps({**meta, "tokens": {**meta["tokens"], "valid": meta["tokens"]["valid"] + 1}}))
        with pytest.raises(ValueError, match="expected"): load_tokens(run, "valid")
        mpath.write_text(good)
        with pytest.raises(ValueError, match="unknown split"): load_tokens(run, "dev")
    finally: mpath.write_text(good)
    assert len(load_tokens(run, "valid")) == meta["tokens"]["valid"]

def test_other_tokenizer_detected(staged, tmp_path):
    "Memmaps of one run next to the tokenizer of another (vocabulary one id off) fail to load."
    run, _ = staged
    other = Run(tmp_path/"other", preset(vocab_size=1023))
    import shutil
    shutil.copytree(run/"tokens", other/"tokens")
    save_tokenizer(to_hf(train_bpe((run/"data"/"valid.txt").read_text(), 1023)), other/"tokenizer")
    with pytest.raises(ValueError, match="sha256"): load_tokens(other, "train")

def test_stage_missing_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.txt"): tokenizer_stage(Run(tmp_path, preset()))
    with pytest.raises(FileNotFoundError, match="meta.json"): load_tokens(Run(tmp_path, preset()), "train")

@pytest.mark.filterwarnings("ignore:train_bpe")
def test_trains_on_train_split_only(tmp_path):
    "A string that fills the validation split but never occurs in training must not become a token."
    run = Run(tmp_path, preset(vocab_size=300))
    (run/"data").mkdir(parents=True)
    (run/"data"/"train.txt").write_text(EOT.join(["the cat sat on the mat. " * 40, "a dog and a cat. " * 40]))
    (run/"data"/"valid.txt").write_text("qzqzqzqz " * 2000)
    (run/"data"/"test.txt").write_text("")
    s = tokenizer_stage(run)
    vocab = load_tokenizer(run/"tokenizer").get_vocab()
    assert not any("qz" in t for t in vocab) and any("cat" in t for t in vocab)
    assert s["tokens"]["test"] == 0 and len(load_tokens(run, "test")) == 0
    assert decode(load_tokenizer(run/"tokenizer").backend_tokenizer, load_tokens(run, "valid")) == "qzqzqzqz " * 2000
    assert read_marker(run, "tokenizer")["summary"] == s   # the registry recorded it

@pytest.mark.filterwarnings("ignore:train_bpe")
def test_failed_stage_leaves_old_outputs(staged, tmp_path, monkeypatch):
    import microlm.tokenizer as T
    run = Run(tmp_path, preset(vocab_size=300))
    (run/"data").mkdir(parents=True)
    for s in SPLITS: (run/"data"/f"{s}.txt").write_text("the cat sat on the mat. " * 40)
    tokenizer_stage(run)
    old = (run/"tokens"/"train.bin").read_bytes()
    def boom(*a, **k): raise RuntimeError("disk full")
    monkeypatch.setattr(T, "encode_docs", boom)
    with pytest.raises(RuntimeError, match="disk full"): tokenizer_stage(run, force=True)
    assert (run/"tokens"/"train.bin").read_bytes() == old
    assert sorted(p.name for p in (run/"tokens").iterdir()) == ["meta.json", "test.bin", "train.bin", "valid.bin"]
