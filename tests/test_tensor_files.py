"""run/tensor_files: the one reader of tensor files (safetensors, zip and legacy torch files), its state-dict
unwrapping and its one typed error telling pickled code from a damaged file."""

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from lowmem_alignprop.run import tensor_files
from lowmem_alignprop.run.tensor_files import TensorFileError, read_safetensors_shapes, read_tensor_file

SD = {"a.weight": torch.arange(6.0).reshape(2, 3), "b.bias": torch.ones(4)}


def _same(got, want=SD):
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def _code(mark):
    """An object that, unpickled with code allowed, makes the folder ``mark``."""
    class Code:
        def __reduce__(self):
            return (os.mkdir, (str(mark),))
    return Code()


def helper_function():  # a module-level function, pickled by reference
    return 0


class Plain:  # a module-level class: its instances pickle as a global and their __dict__
    def __init__(self):
        self.x = 1


def test_a_safetensors_file_is_read_with_safetensors_and_its_header_alone_gives_the_shapes(tmp_path):
    save_file(SD, str(tmp_path / "w.safetensors"))
    _same(read_tensor_file(tmp_path / "w.safetensors"))
    assert read_safetensors_shapes(tmp_path / "w.safetensors") == {"a.weight": (2, 3), "b.bias": (4,)}
    save_file(SD, str(tmp_path / "W.SafeTensors"))  # the suffix in any case (a Windows download's)
    _same(read_tensor_file(tmp_path / "W.SafeTensors"))


def test_a_zip_torch_file_is_memory_mapped_and_a_legacy_one_read_whole(tmp_path, monkeypatch):
    torch.save(SD, tmp_path / "zip.pt")
    torch.save(SD, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real(*a, **k))
    _same(read_tensor_file(tmp_path / "zip.pt"))
    _same(read_tensor_file(tmp_path / "legacy.pt"))  # (mmap would raise RuntimeError here)
    _same(read_tensor_file(tmp_path / "zip.pt", mmap=False))
    assert [(c["mmap"], c["weights_only"], c["map_location"]) for c in calls] == \
        [(True, True, "cpu"), (False, True, "cpu"), (False, True, "cpu")]


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's list of this process's mappings")
def test_a_checkpoints_optimizer_state_is_read_whole_not_mapped(tmp_path):
    """run.checkpoint.load_tensors (optimizer and RNG state, kept for the run): the file is not mapped while its tensors
    live, so pruning that checkpoint later frees its disk space (a mapping would hold the deleted file)."""
    from lowmem_alignprop.run import checkpoint as ckpt

    torch.save(SD, tmp_path / "optimizer.pt")

    def mapped() -> bool:
        return str(tmp_path / "optimizer.pt") in open("/proc/self/maps").read()

    held = read_tensor_file(tmp_path / "optimizer.pt")
    assert mapped()  # (the premise: a plain read maps it, and /proc/self/maps shows that)
    del held
    kept = ckpt.load_tensors(tmp_path / "optimizer.pt")
    _same(kept)
    assert not mapped()


def test_nested_state_dicts_are_unwrapped_only_when_asked(tmp_path):
    torch.save({"state_dict": {"state_dict": SD}, "epoch": 3}, tmp_path / "nested.ckpt")
    _same(read_tensor_file(tmp_path / "nested.ckpt", unwrap=True))
    assert set(read_tensor_file(tmp_path / "nested.ckpt")) == {"state_dict", "epoch"}
    assert tensor_files.unwrap_state_dict({"state_dict": 5}) == {"state_dict": 5}  # not a dict: left as it is
    assert tensor_files.unwrap_state_dict([1]) == [1]


def test_an_optimizer_state_of_nested_dicts_and_numbers_is_read(tmp_path):
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones(3)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    state = read_tensor_file(tmp_path / "optimizer.pt", mmap=False)
    assert torch.equal(state["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert state["param_groups"][0]["lr"] == opt.param_groups[0]["lr"]


@pytest.mark.parametrize("what", ["reduce_to_os_mkdir", "class_instance", "function", "legacy_class_instance"])
def test_a_file_holding_pickled_code_is_refused_as_code_and_never_run(what, tmp_path):
    value = {"reduce_to_os_mkdir": lambda: _code(tmp_path / "ran"), "class_instance": Plain,
             "function": lambda: helper_function, "legacy_class_instance": Plain}[what]()
    legacy = {"_use_new_zipfile_serialization": False} if what.startswith("legacy") else {}
    torch.save({"w": torch.ones(2), "x": value}, tmp_path / "code.pt", **legacy)
    with pytest.raises(TensorFileError) as e:
        read_tensor_file(tmp_path / "code.pt")
    assert e.value.holds_code and e.value.path == tmp_path / "code.pt" and not (tmp_path / "ran").exists()
    assert e.value.detail.startswith("unsupported global ") and "\n" not in e.value.detail, e.value.detail


@pytest.mark.parametrize("name, content", [
    ("cut.pt", "zip"), ("cut_legacy.pt", "legacy"), ("cut.safetensors", "safetensors"),
    ("text.pt", b"version https://git-lfs.github.com/spec/v1\noid sha256:0\n"),  # a git-lfs pointer
    ("zeros.bin", b"PK\x03\x04" + b"\0" * 40),
    ("header.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{"), ("empty.pt", b""),
])
def test_a_damaged_file_is_damaged_not_code_with_a_short_reason(name, content, tmp_path):
    path = tmp_path / name
    if isinstance(content, str):  # a whole file of that format, cut in half
        whole = tmp_path / f"whole.{content}"
        if content == "safetensors":
            save_file(SD, str(whole))
        else:
            torch.save(SD, whole, _use_new_zipfile_serialization=content == "zip")
        content = whole.read_bytes()[: whole.stat().st_size // 2]
    path.write_bytes(content)
    readers = [read_tensor_file] + ([read_safetensors_shapes] if name.endswith(".safetensors") else [])
    for reader in readers:
        with pytest.raises(TensorFileError) as e:
            reader(path)
        assert not e.value.holds_code
        detail = e.value.detail
        assert detail and "\n" not in detail and len(detail) <= 120 and "Weights only load failed" not in detail, detail


def test_an_unreadable_file_raises_its_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_tensor_file(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError):
        read_safetensors_shapes(tmp_path / "missing.safetensors")
    with pytest.raises(IsADirectoryError):
        read_tensor_file(tmp_path)
    if os.geteuid() != 0:  # root reads any file
        torch.save(SD, tmp_path / "locked.pt")
        (tmp_path / "locked.pt").chmod(0)
        with pytest.raises(PermissionError):
            read_tensor_file(tmp_path / "locked.pt")


def test_a_plain_pickle_holding_code_is_refused_as_code(tmp_path):
    """Not written by torch.save: pickle.dump of protocol 2 (what torch.save writes) with a reduce to os.mkdir."""
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"x": _code(tmp_path / "ran")}, f, protocol=2)
    with pytest.raises(TensorFileError) as e:
        read_tensor_file(tmp_path / "plain.pkl")
    assert e.value.holds_code and "mkdir" in e.value.detail and not (tmp_path / "ran").exists()


def test_each_caller_words_the_typed_error_as_its_own_one_line(tmp_path):
    """arch (--model), the CLIP rewards (reward_weights), resume (a checkpoint's optimizer.pt): code and damage."""
    from lowmem_alignprop.models import arch
    from lowmem_alignprop.rewards import clip_rewards
    from lowmem_alignprop.run import checkpoint as ckpt
    from lowmem_alignprop.settings.errors import UserError

    torch.save({"state_dict": SD}, tmp_path / "whole.ckpt")
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "whole.ckpt").read_bytes()[:200])  # a zip cut short
    torch.save({"w": torch.ones(1), "x": _code(tmp_path / "ran")}, tmp_path / "code.ckpt")
    cases = [(arch.detect_arch, "cut.ckpt", r"cannot read checkpoint .*cut\.ckpt \(PytorchStreamReader failed reading "
              r"zip archive: failed finding central directory\): it is not a PyTorch checkpoint \(damaged"),
             (arch.detect_arch, "code.ckpt", "holds pickled Python objects besides tensors"),
             (clip_rewards._torch_load, "cut.ckpt", r"cannot read .*cut\.ckpt as a torch checkpoint \(PytorchStream"),
             (clip_rewards._torch_load, "code.ckpt", r"holds pickled code .*reward_weights"),
             (clip_rewards._torch_load, "missing.pt", r"as a torch checkpoint \(FileNotFoundError: No such file or "
                                                      r"directory\)"),
             (ckpt.load_tensors, "cut.ckpt", r"cannot be read \(PytorchStreamReader.*\): it is damaged; use --resume"),
             (ckpt.load_tensors, "code.ckpt", "holds pickled code")]
    for read, name, message in cases:
        with pytest.raises(UserError, match=message) as e:
            read(tmp_path / name)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "ran").exists()
    assert arch._read_shapes(tmp_path / "whole.ckpt") == {"a.weight": (2, 3), "b.bias": (4,)}  # unwrapped
