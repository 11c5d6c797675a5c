"""CLIP's BPE tokenizer: ids equal the official tokenizer's (open_clip's SimpleTokenizer, a
copy of OpenAI's, with the vocabulary file its package ships); the learnt fallback against a
direct transcription of BPE learning (Sennrich et al. 2016) and the same official encoder
given the learnt merges; save/load through torch.load(weights_only=True)."""
import collections
import gzip
import os
import random

import pytest
import torch

from gissl.errors import UserError
from gissl.tokenizer import ClipTokenizer, bytes_to_unicode, clean_text, split_words

open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")

BASE = [
    "A 5 mm sessile polyp in the sigmoid colon.", "Normal cecum with the appendiceal orifice.",
    "Ulcerative colitis, Mayo grade 2-3; friable mucosa!!", "z-line (GE junction) @ 40cm",
    "", "   ", "\t\n", "x", "It's there; they're fine, we'll see, I'd say, you've, I'm",
    "I'M THERE'S WE'LL HE'D", "Café naïve résumé crème brûlée Ærø Ñandú", "½ ² Ⅻ ١٢٣ ๓ 一二三",
    "emoji 🙂👍🏽 ❤️ 🇫🇷 👨‍👩‍👧", "’curly’ “quotes” ‚low‛ ﬁne ﬂow ǅ", "ＦＵＬＬ　width １２３ ｶﾀｶﾅ",
    "<end_of_text> <start_of_text> inside", "&amp;lt;b&amp;gt; html &amp;amp; &quot;x&quot;",
    "ß ǅ İstanbul ΣΑΣ ﬀ", "a\u0301 combining e\u0345 n\u0303", "中文字符测试 日本語のテキスト 한국어",
    "mixed123abc 3.14 -1e5 10^6 $42", "under_score snake_case __init__", "polyp" * 40,
    "word " * 100, "ß" * 300, "control\x00\x07chars\x7f\ufeff here", "tab\tnew\nline\r\ncr",
    "Ελληνικά Русский עברית العربية हिन्दी ไทย", "a.b,c;d:e!f?g'h\"i", "''''s 's' t' 're",
]
POOL = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"-_()[]/%+&#@")
POOL += list("éèêëàâäôöûüçñßøåæœÉÀÇ’‘“”…–—½²³µ°±×÷一中文日本한글ÅΩЖжשע١٢😀🙂👍🏽❤️🇫🇷\u0301\u0345\u200d\u3000ａｂ１ﬁ")


def _captions(n=300, seed=0):
    rng = random.Random(seed)
    out = list(BASE)
    while len(out) < n:
        out.append("".join(rng.choice(POOL) for _ in range(rng.randint(0, 120))))
    return out


@pytest.fixture(scope="module")
def official():
    path = open_clip_tokenizer.default_bpe()
    return path, open_clip_tokenizer.SimpleTokenizer(path)


def test_ids_equal_official_tokenizer(official):
    path, reference = official
    ours = ClipTokenizer.from_file(path)
    caps = _captions()
    assert ours.vocab_size == reference.vocab_size == 49408
    assert ours.eot_token_id == reference.eot_token_id == 49407
    assert ours.sot_token_id == reference.sot_token_id == 49406
    assert torch.equal(ours(caps), reference(caps))
    assert torch.equal(ours(caps, context_length=16), reference(caps, context_length=16))


def test_without_ftfy_equal_where_both_apply(official):
    # Without ftfy only mojibake repair is missing: compare on the captions in which ftfy's
    # repair step finds none (random strings sometimes look like mis-decoded UTF-8).
    ftfy = pytest.importorskip("ftfy")
    path, reference = official
    ours = ClipTokenizer.from_file(path, use_ftfy=False)
    caps = [c for c in _captions() if ftfy.fix_encoding(c) == c]
    assert len(caps) > 250
    assert torch.equal(ours(caps), reference(caps))
    # The documented difference: mis-decoded UTF-8 is repaired by ftfy only.
    assert clean_text("cafÃ©", use_ftfy=False) == "cafã©"


def test_special_tokens_padding_and_truncation(official):
    tok = ClipTokenizer.from_file(official[0])
    empty = tok([""])[0]
    assert empty[:2].tolist() == [tok.sot_token_id, tok.eot_token_id] and not empty[2:].any()
    long = tok(["polyp " * 200])[0]
    assert long.shape == (77,) and long[-1] == tok.eot_token_id and long.argmax() == 76
    assert tok.decode(tok(["A Polyp, 5 mm!"])[0]) == "a polyp , 5 mm !"
    assert tok("one caption").shape == (1, 77)


def _reference_learn(captions, n_merges):
    # BPE learning (Sennrich et al. 2016, Alg. 1) recounting all pairs each step, on CLIP's
    # words in byte symbols with "</w>" on the last symbol; ties -> smallest pair.
    vocab = collections.Counter()
    table = bytes_to_unicode()
    for c in captions:
        for w in split_words(clean_text(c)):
            s = [table[b] for b in w.encode("utf-8")]
            vocab[tuple(s[:-1] + [s[-1] + "</w>"])] += 1
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for word, f in vocab.items():
            for p in zip(word, word[1:]):
                pairs[p] += f
        if not pairs or max(pairs.values()) < 2:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merged = collections.Counter()
        for word, f in vocab.items():
            out, i = [], 0
            while i < len(word):
                if word[i:i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += f
        vocab = merged
        merges.append(best)
    return merges


def test_learnt_bpe_matches_transcription_and_official_encoder(tmp_path):
    caps = _captions(200, seed=1) + ["a small polyp in the colon", "a large polyp in the cecum"] * 20
    tok = ClipTokenizer.learn(caps, vocab_size=514 + 150)
    assert tok.merges == _reference_learn(caps, 150)
    assert tok.vocab_size == 514 + len(tok.merges) and tok.eot_token_id == tok.vocab_size - 1
    # The official encoder reading the learnt merges in CLIP's file format gives the same ids.
    vocab_file = tmp_path / "learnt.txt.gz"
    vocab_file.write_bytes(gzip.compress(
        ("#version: learnt\n" + "\n".join(" ".join(m) for m in tok.merges)).encode("utf-8")))
    reference = open_clip_tokenizer.SimpleTokenizer(str(vocab_file))
    assert torch.equal(tok(caps), reference(caps))
    assert torch.equal(ClipTokenizer.from_file(vocab_file)(caps), tok(caps))
    assert tok.decode(tok(["a small polyp"])[0]) == "a small polyp"


def test_state_dict_round_trip(tmp_path):
    caps = _captions(60, seed=2)
    tok = ClipTokenizer.learn(caps, vocab_size=700, use_ftfy=False)
    path = tmp_path / "tok.pth"
    torch.save({"tokenizer": tok.state_dict()}, path)
    again = ClipTokenizer.from_state(torch.load(path, weights_only=True)["tokenizer"])
    assert again.merges == tok.merges and again.use_ftfy is False
    assert torch.equal(again(caps), tok(caps))
    assert os.path.getsize(path) < 100_000


def test_bad_inputs_name_the_flag(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("#version\nonly-one-symbol\n")
    with pytest.raises(UserError, match="--tokenizer"):
        ClipTokenizer.from_file(bad)
    with pytest.raises(UserError, match="--tokenizer"):
        ClipTokenizer.from_file(tmp_path / "missing.txt.gz")
    with pytest.raises(UserError, match="--tokenizer"):
        ClipTokenizer.from_state({"kind": "wordpiece"})
    with pytest.raises(UserError, match="vocab-size"):
        ClipTokenizer.learn(["x"], vocab_size=100)
