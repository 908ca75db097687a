"""Prompts longer than a text encoder reads: diffusers cuts them to the tokenizer's length in silence; a run and
``sample`` say so once (which encoder, how many prompts, the words one of them loses)."""

from __future__ import annotations


def cut_prompts_note(tokenizer, prompts: list[str], limit: int | None = None, reader: str = "the text encoder",
                     fix: str = "shorten them to keep every word") -> str | None:
    """A warning when prompts are longer than the text encoder reads (``limit`` tokens, special ones included; by
    default the tokenizer's own: CLIP's 77), which diffusers cuts: how many, and the words one of them loses."""
    limit = limit or tokenizer.model_max_length
    cut = {}
    for p in dict.fromkeys(prompts):
        ids = tokenizer(p, truncation=False).input_ids
        if len(ids) > limit:
            # (the last kept: the end token the cut prompt gets); a byte-level cut inside a character (an emoji's
            # bytes) decodes to U+FFFD: the character kept in part is left out
            cut[p] = tokenizer.decode(ids[limit - 1:], skip_special_tokens=True).strip().lstrip("\ufffd").strip()
    if not cut:
        return None
    first, lost = next(iter(cut.items()))
    count = sum(1 for p in prompts if p in cut)
    return (f"{count} of {len(prompts)} prompts are longer than the {limit} tokens {reader} reads: their ends are "
            f"ignored (e.g. {first[:40]!r}... loses {lost[:60] + ('...' if len(lost) > 60 else '')!r}); {fix}")
