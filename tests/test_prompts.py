import pytest

from lowmem_alignprop.settings.config import Config
from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.step.prompts import PROMPT_SETS, load_prompts


def test_simple_animals():
    prompts = load_prompts("simple_animals")
    assert 40 <= len(prompts) <= 60
    assert {"cat", "dog", "horse"} <= set(prompts)
    assert len(set(prompts)) == len(prompts)
    assert all(p == p.strip() and p and not p.startswith("#") for p in prompts)


def test_animals_activities():
    prompts = load_prompts("animals_activities")
    animals = load_prompts("simple_animals")
    assert len(prompts) % len(animals) == 0 and len(prompts) > len(animals)
    assert all(p.startswith("a ") for p in prompts)
    assert any(p.startswith("a dog ") for p in prompts)


def test_prompt_sets_listed():
    for name, description in PROMPT_SETS.items():
        assert description
        assert load_prompts(name)


def test_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# my prompts\n\n  a red car  \nune girafe à vélo\n   \n# end\n", encoding="utf-8")
    assert load_prompts(str(f)) == ["a red car", "une girafe à vélo"]


@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n  \n"])
def test_empty_file(tmp_path, content):
    f = tmp_path / "empty.txt"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match="no prompts"):
        load_prompts(str(f))


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist") as err:
        load_prompts(str(tmp_path / "nope.txt"))
    assert "simple_animals" in str(err.value)


def test_not_utf8(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(UserError, match="UTF-8"):
        load_prompts(str(f))


def test_unknown_name():
    with pytest.raises(UserError) as err:
        load_prompts("no_such_set")
    message = str(err.value)
    assert "simple_animals" in message and "animals_activities" in message and "\n" not in message


def test_shuffled_prompt_order_holds_every_prompt_once_per_pass_and_needs_no_state():
    import random

    from lowmem_alignprop.step.prompts import draw_prompts

    prompts = [f"p{i}" for i in range(5)]
    run = draw_prompts(prompts, "shuffled", random.Random(0), 0, 23, seed=7)
    passes = [run[i:i + 5] for i in range(0, 20, 5)]
    assert all(sorted(p) == prompts for p in passes)  # each pass a permutation of the set
    assert len({tuple(p) for p in passes}) > 1  # ... a fresh one each pass
    # batch by batch (as steps draw them) gives the same sequence: a resumed run draws what an uninterrupted one does
    assert sum((draw_prompts(prompts, "shuffled", random.Random(1), n, 3, seed=7) for n in range(0, 21, 3)), []) \
        == draw_prompts(prompts, "shuffled", random.Random(2), 0, 21, seed=7)
    assert draw_prompts(prompts, "shuffled", random.Random(0), 0, 20, seed=8) != run[:20]  # seeded
    # random: with replacement, from the given generator (the trainer's, whose state checkpoints keep)
    rng = random.Random(3)
    expected = [rng.choice(prompts) for _ in range(8)]
    assert draw_prompts(prompts, "random", random.Random(3), 0, 8, seed=7) == expected


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig"])
def test_a_prompt_file_windows_wrote_is_read(tmp_path, encoding):
    """PowerShell 5.1's `echo ... > prompts.txt` writes UTF-16 with a byte-order mark, Notepad UTF-8 with one; CRLF
    line ends either way."""
    f = tmp_path / "prompts.txt"
    f.write_bytes("a caf\u00e9 at night\r\n# a comment\r\na red fox\r\n".encode(encoding))
    assert load_prompts(str(f)) == ["a caf\u00e9 at night", "a red fox"]


def test_a_prompt_file_that_is_not_utf8_is_told_where_and_how_to_fix_it(tmp_path):
    """A Windows-1252 file (Notepad's "ANSI"), one with a UTF-8 byte-order mark and CRLF, said only "is not valid
    UTF-8 (byte 6)" (the byte counted after the mark), and UTF-16 without a mark "line 1 holds the control character
    '\\x00'": each names the line and column an editor shows, the byte of the file, and the fix."""
    import codecs

    cases = {
        "ansi.txt": ("a red fox\r\nun caf\xe9\r\n".encode("cp1252"),
                     "line 2, column 7 (byte 17 of the file) holds 0xE9 (in Windows-1252: '\xe9')"),
        "bom.txt": (codecs.BOM_UTF8 + b"a cat\r\n\r\nna\xefve\r\n",
                    "line 3, column 3 (byte 14 of the file) holds 0xEF (in Windows-1252: '\xef')"),
        "utf16.txt": ("a cat\r\na dog\r\n".encode("utf-16-le"),
                      "it looks like UTF-16 without a byte-order mark (a NUL byte beside each letter)"),
    }
    for name, (data, where) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError) as err:
            load_prompts(str(tmp_path / name))
        assert str(err.value) == (f"prompt file {tmp_path / name} is not UTF-8 text: {where}; save it as UTF-8 "
                                  "(Notepad: Save as, Encoding UTF-8)")
    cut = tmp_path / "cut.txt"  # UTF-16 by its mark, cut off in the middle of a character
    cut.write_bytes("ab\r\ncd".encode("utf-16") + b"\x00")
    with pytest.raises(UserError) as err:
        load_prompts(str(cut))
    assert str(err.value) == (f"prompt file {cut} is not UTF-8 text, and not UTF-16 though it starts with UTF-16's "
                              "byte-order mark: line 2, column 3 (byte 14 of the file) does not decode (truncated "
                              "data); save it as UTF-8 (Notepad: Save as, Encoding UTF-8)")


def test_a_prompt_file_is_cut_into_lines_where_an_editor_ends_them(tmp_path):
    """str.splitlines also ended a line at a form feed, \\x1c-\\x1e, \\x85 and U+2028: 'a cat<FF>a dog' trained as two
    prompts with no line between them, and the control-character check (run on those pieces) never saw it. A byte-order
    mark inside the file (two Notepad files joined with `type a.txt b.txt > all.txt`) stayed in the prompt as
    '\\ufeffa dog'."""
    import codecs

    joined = tmp_path / "joined.txt"
    joined.write_bytes(codecs.BOM_UTF8 + b"a cat\r\n" + codecs.BOM_UTF8 + b"a dog\r\n\xef\xbb\xbf  a fox")
    assert load_prompts(str(joined)) == ["a cat", "a dog", "a fox"]
    old_mac = tmp_path / "cr.txt"
    old_mac.write_bytes(b"a cat\ra dog\r")
    assert load_prompts(str(old_mac)) == ["a cat", "a dog"]
    for char, what in (("\x0c", "control character '\\x0c'"), ("\x85", "control character '\\x85'"),
                       ("\u2028", "line separator '\\u2028'")):
        f = tmp_path / "odd.txt"
        f.write_bytes(f"a cat\r\na dog{char}a fox\r\n".encode())
        with pytest.raises(UserError) as err:
            load_prompts(str(f))
        assert str(err.value) == (f"prompt file {f} line 2 holds the {what}: it is not a text file of prompts; write "
                                  "one prompt per line")


def test_prompts_longer_than_the_encoder_that_carries_their_tokens_reads_are_said():
    """SD3/FLUX: T5 carries the prompt's tokens, max_sequence_length of them: prompts past it were cut in silence
    (the note counted CLIP's 77 tokens, which T5 reads past). SD3 without T5 reads CLIP's length; a UNet model CLIP's.
    The note names the encoder, the words a cut prompt loses and the fix."""
    from types import SimpleNamespace

    from flowmodels import _clip_tokenizer, tiny_t5_tokenizer

    from lowmem_alignprop.models.family import FlowFamily, UNetFamily

    clip, t5 = _clip_tokenizer()[0], tiny_t5_tokenizer()  # both read 16 tokens
    short, long = "a photo of a cat", "a red cat on a sofa in the sun"  # 6 and 17 T5 tokens, 12 and 19 CLIP tokens
    prompts = [short, long, long]

    def family(name, t5_tok=t5, guidance=True):
        comps = SimpleNamespace(family=name, tokenizer=clip, tokenizer_2=t5_tok if name == "flux" else clip,
                                tokenizer_3=t5_tok if name == "sd3" else None,
                                unet=SimpleNamespace(config=SimpleNamespace(guidance_embeds=guidance)))
        return FlowFamily(comps) if name != "unet" else UNetFamily(comps)

    flux = family("flux").cut_prompts_note(Config(max_sequence_length=4), prompts)
    assert flux.startswith("3 of 3 prompts are longer than the 4 tokens T5 (max_sequence_length=4) reads: their "
                           "ends are ignored (e.g. 'a photo of a cat'... loses 'a cat'); raise --set "
                           "max_sequence_length (up to 16) or shorten them"), flux
    assert family("sd3").cut_prompts_note(Config(max_sequence_length=16), prompts).startswith(
        "2 of 3 prompts are longer than the 16 tokens T5 (max_sequence_length=16) reads")
    assert family("flux").cut_prompts_note(Config(max_sequence_length=16), [short]) is None
    from lowmem_alignprop.models.flow_loading import _stand_in_t5_tokenizer  # an architecture's: letters, not T5's
    assert family("flux", t5_tok=_stand_in_t5_tokenizer(16)).cut_prompts_note(Config(), prompts) is None
    for without_t5 in (family("sd3", t5_tok=None), family("unet")):  # CLIP carries the tokens: its 16
        said = without_t5.cut_prompts_note(Config(), prompts)
        assert said.startswith("2 of 3 prompts are longer than the 16 tokens the text encoder reads: their ends are "
                               "ignored (e.g. 'a red cat on a sofa in the sun'... loses ") and said.endswith(
                                   "shorten them to keep every word"), said


def test_a_cut_inside_a_character_leaves_out_the_part_of_it_kept():
    """A byte-level tokenizer cut inside an emoji's bytes: the lost words start with U+FFFD when decoded (the note
    printed a broken character); the part of the character kept is left out of the note."""
    from types import SimpleNamespace

    from lowmem_alignprop.models.prompt_length import cut_prompts_note

    tokenizer = type("Tok", (), {"model_max_length": 3,
                                 "__call__": lambda self, p, truncation: SimpleNamespace(input_ids=list(range(6))),
                                 "decode": lambda self, ids, skip_special_tokens: "\ufffd \u201cquoted\u201d"})()
    note = cut_prompts_note(tokenizer, ["a \U0001F53A \u201cquoted\u201d"])
    assert "loses '\u201cquoted\u201d'" in note and "\ufffd" not in note, note
