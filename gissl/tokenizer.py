"""CLIP's byte-level BPE tokenizer (Radford et al. 2021), with no runtime dependency.

Given CLIP's vocabulary file ``bpe_simple_vocab_16e6.txt.gz`` the ids equal the official
tokenizer's. Without one, :meth:`ClipTokenizer.learn` learns byte-level BPE merges from the
training captions; :meth:`ClipTokenizer.state_dict` keeps them as plain lists so a checkpoint
carries the tokenizer and evaluation tokenizes exactly as training did.

Vocabulary layout (as CLIP's): the 256 byte symbols, the same with ``</w>`` (end of word),
one token per merge in merge order, then ``<start_of_text>`` and ``<end_of_text>``. The
end-of-text id is therefore the largest id, which is what CLIP's text tower pools at
(``argmax`` of the token ids).

Text cleaning follows CLIP: ``ftfy.fix_text`` when ftfy is installed, HTML unescaped twice,
whitespace collapsed, lower case. Without ftfy the fixes that need no model of mojibake are
applied by hand (NFC, curly quotes, Latin ligatures, full-width forms, control characters);
only text with mis-decoded UTF-8 ("cafÃ©") then tokenizes differently from CLIP's.
"""

from __future__ import annotations

import collections
import functools
import gzip
import html
import re
import unicodedata

import torch

from gissl.errors import UserError

SOT = "<start_of_text>"
EOT = "<end_of_text>"
# CLIP's vocabulary file: a version line, then merges; CLIP uses the first 48894 of them
# so that 512 byte symbols + merges + 2 special tokens make 49408 ids.
OFFICIAL_MERGES = 49152 - 256 - 2


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible map from the 256 byte values to printable characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


# CLIP's pre-tokenizer is ``'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+``
# (case-insensitive, special tokens first) in the `regex` module. The stdlib spelling: ``\w``
# is exactly letters, numbers and "_", so runs of ``[^\W_]`` are split afterwards into letter
# runs and single numbers. U+0345 is matched by no branch of CLIP's pattern (it case-folds to
# a letter, so the negated class refuses it) and is dropped there; it is dropped here too.
_WORDS = re.compile(f"{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|[^\\W_]+|(?:[^\\w\\s\u0345]|_)+",
                    re.IGNORECASE)


def split_words(text: str) -> list[str]:
    """Cleaned text -> CLIP's words (letter runs, single numbers, punctuation runs, ...)."""
    words = []
    for w in _WORDS.findall(text):
        if w[0].isalnum():
            words.extend(_split_alnum(w))
        else:
            words.append(w)
    return words


def _split_alnum(run: str) -> list[str]:
    """A run of letters and numbers -> letter runs and one token per number character."""
    out, letters = [], ""
    for c in run:
        if c.isalpha():
            letters += c
            continue
        if letters:
            out.append(letters)
            letters = ""
        out.append(c)
    if letters:
        out.append(letters)
    return out


# What ftfy.fix_text changes in text that is not mojibake (its uncurl_quotes,
# fix_latin_ligatures, fix_character_width, remove_control_chars and NFC steps), for when
# ftfy is not installed.
_QUOTES = str.maketrans({c: "'" for c in "\u02bc\u2018\u2019\u201a\u201b"}
                        | {c: '"' for c in "\u201c\u201d\u201e\u201f"})
_LIGATURES = str.maketrans({
    "\u0132": "IJ", "\u0133": "ij", "\u0149": "\u02bcn", "\u01c4": "D\u017d", "\u01c5": "D\u017e",
    "\u01c6": "d\u017e", "\u01c7": "LJ", "\u01c8": "Lj", "\u01c9": "lj", "\u01ca": "NJ",
    "\u01cb": "Nj", "\u01cc": "nj", "\u01f1": "DZ", "\u01f2": "Dz", "\u01f3": "dz",
    "\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl",
    "\ufb05": "\u017ft", "\ufb06": "st"})
_CONTROL = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f\u206a-\u206f\ufeff\ufff9-\ufffc]")
_WIDE = re.compile("[\u3000\uff01-\uffef]")


def _fix_text_stdlib(text: str) -> str:
    text = _CONTROL.sub("", text)
    text = text.translate(_LIGATURES)
    text = _WIDE.sub(lambda m: " " if m.group() == "\u3000"
                     else unicodedata.normalize("NFKC", m.group()), text)
    text = text.translate(_QUOTES)
    return unicodedata.normalize("NFC", text)


def clean_text(text: str, *, use_ftfy: bool = True) -> str:
    """CLIP's cleaning: fix text, unescape HTML twice, collapse whitespace, lower case."""
    fixed = None
    if use_ftfy:
        try:
            import ftfy
        except ImportError:
            pass
        else:
            fixed = ftfy.fix_text(text)
    if fixed is None:
        fixed = _fix_text_stdlib(text)
    text = html.unescape(html.unescape(fixed)).strip()
    return " ".join(text.split()).lower()


def _merge_word(word: tuple, pair: tuple, joined: str) -> tuple:
    """Replace every non-overlapping occurrence of ``pair`` in ``word`` (left to right)."""
    out, i = [], 0
    while i < len(word):
        if i < len(word) - 1 and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(joined)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


class ClipTokenizer:
    """Byte-level BPE with CLIP's vocabulary layout.

    ``tokenizer(texts, context_length=77)`` -> LongTensor ``(N, context_length)``:
    ``<start_of_text>`` ids ``<end_of_text>`` then zeros; a too-long text is cut and its last
    token set to ``<end_of_text>``, as CLIP does.
    """

    def __init__(self, merges: list[tuple[str, str]], *, use_ftfy: bool = True):
        self.merges = [tuple(m) for m in merges]
        byte_symbols = list(bytes_to_unicode().values())
        vocab = byte_symbols + [s + "</w>" for s in byte_symbols]
        vocab += ["".join(m) for m in self.merges] + [SOT, EOT]
        # Two merges can spell the same token ("a"+"bc", "ab"+"c"); as in CLIP the later id
        # is the one used.
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = vocab
        self.ranks = {m: i for i, m in enumerate(self.merges)}
        self.use_ftfy = use_ftfy
        self.sot_token_id = self.encoder[SOT]
        self.eot_token_id = self.encoder[EOT]
        self.vocab_size = len(vocab)
        self._cache: dict[str, list[int]] = {}

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_file(cls, path, *, use_ftfy: bool = True) -> "ClipTokenizer":
        """Load CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (gzip or plain text)."""
        try:
            with open(path, "rb") as f:
                raw = f.read()
            text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")
        except (OSError, UnicodeDecodeError, EOFError) as e:
            raise UserError(f"--tokenizer {path}: cannot read the BPE vocabulary ({e}); give "
                            "CLIP's bpe_simple_vocab_16e6.txt.gz") from e
        lines = text.rstrip("\n").split("\n")[1:OFFICIAL_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        if not merges or any(len(m) != 2 for m in merges):
            raise UserError(f"--tokenizer {path}: not a BPE merges file (each line after the "
                            "first must be two symbols); give CLIP's bpe_simple_vocab_16e6.txt.gz")
        return cls(merges, use_ftfy=use_ftfy)

    @classmethod
    def learn(cls, captions, *, vocab_size: int = 8192, use_ftfy: bool = True) -> "ClipTokenizer":
        """Learn byte-level BPE merges from ``captions`` (an iterable of str) until the
        vocabulary has ``vocab_size`` ids or no pair occurs twice. Ties between equally
        frequent pairs go to the lexicographically smallest pair, so learning is
        deterministic."""
        if vocab_size < 514:
            raise UserError(f"--tokenizer-vocab-size {vocab_size}: must be at least 514 "
                            "(256 bytes twice and 2 special tokens)")
        probe = cls([], use_ftfy=use_ftfy)
        counts = collections.Counter(w for c in captions for w in probe._words(c))
        words = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in counts]
        freqs = list(counts.values())
        pairs, where = collections.Counter(), collections.defaultdict(set)
        for i, w in enumerate(words):
            for p in zip(w, w[1:]):
                pairs[p] += freqs[i]
                where[p].add(i)
        merges = []
        while len(merges) < vocab_size - 514 and pairs:
            best = min(pairs, key=lambda p: (-pairs[p], p))
            if pairs[best] < 2:
                break
            merges.append(best)
            joined = "".join(best)
            for i in sorted(where.pop(best, ())):
                old = words[i]
                new = _merge_word(old, best, joined)
                for p in zip(old, old[1:]):
                    pairs[p] -= freqs[i]
                    if pairs[p] <= 0:
                        del pairs[p]
                for p in zip(new, new[1:]):
                    pairs[p] += freqs[i]
                    where[p].add(i)
                words[i] = new
        return cls(merges, use_ftfy=use_ftfy)

    def state_dict(self) -> dict:
        """Plain data (strings, ints, bools) for a checkpoint; see :meth:`from_state`."""
        return {"kind": "clip-bpe", "merges": [" ".join(m) for m in self.merges],
                "use_ftfy": self.use_ftfy}

    @classmethod
    def from_state(cls, state: dict) -> "ClipTokenizer":
        if not isinstance(state, dict) or state.get("kind") != "clip-bpe":
            raise UserError("the checkpoint's tokenizer entry is not a CLIP BPE tokenizer; "
                            "give the vocabulary with --tokenizer FILE")
        return cls([tuple(m.split(" ")) for m in state["merges"]],
                   use_ftfy=bool(state.get("use_ftfy", True)))

    # -- encoding ----------------------------------------------------------------------
    def _words(self, text: str) -> list[str]:
        """Cleaned text split as CLIP does, each word in byte symbols."""
        table = bytes_to_unicode()
        return ["".join(table[b] for b in w.encode("utf-8"))
                for w in split_words(clean_text(text, use_ftfy=self.use_ftfy))]

    def _bpe(self, word: str) -> list[int]:
        if word in self._cache:
            return self._cache[word]
        if word in (SOT, EOT):
            ids = [self.encoder[word]]
        else:
            parts = tuple(word[:-1]) + (word[-1] + "</w>",)
            while len(parts) > 1:
                pair = min(zip(parts, parts[1:]), key=lambda p: self.ranks.get(p, float("inf")))
                if pair not in self.ranks:
                    break
                parts = _merge_word(parts, pair, "".join(pair))
            ids = [self.encoder[p] for p in parts]
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without start/end tokens."""
        return [i for w in self._words(text) for i in self._bpe(w)]

    def decode(self, ids) -> str:
        """Text of token ids (special tokens and padding zeros after end-of-text dropped)."""
        inverse = {c: b for b, c in bytes_to_unicode().items()}
        out = []
        for i in (int(i) for i in ids):
            if i == self.eot_token_id:
                break
            if i != self.sot_token_id:
                out.append(self.decoder[i])
        # </w> marks a word end: spaces come back from it, the rest maps symbols to bytes.
        pieces = "".join(out).split("</w>")
        raw = b" ".join(bytes(inverse[c] for c in p) for p in pieces)
        return raw.decode("utf-8", errors="replace").strip()

    def __call__(self, texts, context_length: int = 77) -> torch.Tensor:
        """``texts`` (str or list of N str) -> LongTensor ``(N, context_length)``."""
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise UserError(f"--context-length {context_length}: must be at least 2 "
                            "(start and end tokens)")
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id] + self.encode(text) + [self.eot_token_id]
            if len(ids) > context_length:
                ids = ids[:context_length]
                ids[-1] = self.eot_token_id
            out[row, :len(ids)] = torch.tensor(ids)
        return out
