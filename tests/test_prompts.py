import pytest

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
