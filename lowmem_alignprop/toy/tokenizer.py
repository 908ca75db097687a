"""A CLIP tokenizer for the toy grammar, built in code: every grammar word is one token.

The vocabulary is CLIP's byte symbols, alone and word-final (so any text tokenizes, as in ``tiny.py``), the
tokens the merges make, and the two special tokens. The merges come from simulating CLIP's BPE: for each
word, while it does not come out as one token, the merge of its first two pieces is appended. An appended
merge has the lowest priority, so it never changes a word that already merges fully: the loop ends with every
word a single token (checked against the real tokenizer in the tests).
"""

from __future__ import annotations

from .scenes import BACKGROUNDS, COLOURS, COUNT_WORDS, PLURALS, SHAPES, WORD_COUNTS

MAX_LENGTH = 24  # the longest caption is 19 tokens, plus BOS and EOS
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def grammar_words() -> list[str]:
    words = list(WORD_COUNTS) + list(COUNT_WORDS.values()) + list(COLOURS) + list(SHAPES) + list(PLURALS.values())
    words += ["and", "on", "background", ","] + list(BACKGROUNDS)
    return sorted(set(words))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one pre-tokenized word (the lowest-ranked adjacent pair merges first, everywhere)."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = {(a, b) for a, b in zip(pieces, pieces[1:])}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(pieces):
            if i < len(pieces) - 1 and (pieces[i], pieces[i + 1]) == best:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def vocab_and_merges(words: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    words = grammar_words() if words is None else words
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    changed = True
    while changed:
        changed = False
        for w in words:
            pieces = _bpe(w, ranks)
            if len(pieces) > 1:
                ranks[(pieces[0], pieces[1])] = len(merges)
                merges.append((pieces[0], pieces[1]))
                changed = True
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            tokens.append(a + b)
            seen.add(a + b)
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)
