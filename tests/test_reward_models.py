"""Model rewards (aesthetic, clip, pickscore, hpsv2) on tiny CLIP models built from config, saved and
loaded by path through ``build_reward(..., weights=path)`` exactly like real checkpoints."""

import shutil

import numpy as np
import pytest
import torch

from hubcache import cached_snapshot
from numerics import SAME_OPS, assert_rel_close
import torch.nn.functional as F
from PIL import Image

from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.rewards import RewardModule, build_reward
from lowmem_alignprop.rewards.clip_rewards import AESTHETIC_HEAD_FILE, AestheticHead, ClipPreprocess
from lowmem_alignprop.rewards.openclip_convert import (config_from_open_clip, hf_to_open_clip, load_open_clip_as_hf,
                                                       open_clip_to_hf)

MODEL_REWARDS = ["aesthetic", "clip", "pickscore", "hpsv2"]
PROMPTS = ["a cat", "the dog", "a horse riding a bike"]


def tiny_clip(heads=4, seed=0):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from lowmem_alignprop.models.tiny import byte_level_vocab

    torch.manual_seed(seed)
    vocab, merges = byte_level_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=16)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=heads,
                  hidden_act="gelu", projection_dim=16)
    config = CLIPConfig(
        text_config=dict(common, vocab_size=len(vocab), max_position_embeddings=16,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(common, image_size=32, patch_size=8),
        projection_dim=16,
    )
    return CLIPModel(config).eval(), tokenizer


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_models")
    model, tokenizer = tiny_clip()
    clip_dir = root / "clip"
    model.save_pretrained(clip_dir)
    tokenizer.save_pretrained(clip_dir)
    # aesthetic: DIR/sac+logos+ava1-l14-linearMSE.pth + DIR/clip/
    aes_dir = root / "aesthetic"
    shutil.copytree(clip_dir, aes_dir / "clip")
    torch.manual_seed(1)
    torch.save(AestheticHead(16).state_dict(), aes_dir / AESTHETIC_HEAD_FILE)
    # hpsv2: an open_clip-format checkpoint written with the inverse key mapping, + tokenizer + config.json
    hps_dir = root / "hps"
    hps_dir.mkdir()
    torch.save({"state_dict": hf_to_open_clip(model.state_dict()), "epoch": 1}, hps_dir / "HPS_v2_compressed.pt")
    tokenizer.save_pretrained(hps_dir)
    model.config.save_pretrained(hps_dir)
    return {"clip": clip_dir, "pickscore": clip_dir, "hpsv2": clip_dir, "aesthetic": aes_dir, "hps_pt": hps_dir,
            "model": model, "tokenizer": tokenizer, "root": root}


def images(batch=3, h=48, w=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, h, w, generator=g)


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_scores_and_gradients(dirs, name):
    reward = build_reward(name, weights=str(dirs[name]))
    assert isinstance(reward, RewardModule) and reward.name == name
    assert not reward.training and all(not p.requires_grad for p in reward.parameters())
    x = images().requires_grad_(True)
    scores = reward(x, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    scores.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_checkpointing_same_gradient(dirs, name):
    plain = build_reward(name, weights=str(dirs[name]))
    ckpt = build_reward(name, weights=str(dirs[name]), checkpointing=True)
    grads, saved = [], []
    for reward in (plain, ckpt):
        x = images().requires_grad_(True)
        count = [0]

        def pack(t):
            count[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            scores = reward(x, PROMPTS)
        scores.sum().backward()
        grads.append(x.grad)
        saved.append(count[0])
    assert_rel_close(grads[1], grads[0], SAME_OPS, "image gradient")  # a recompute is no approximation
    assert saved[1] < saved[0]  # the checkpointed layers saved only their inputs


def test_scores_match_manual_computation(dirs):
    model, tokenizer = dirs["model"], dirs["tokenizer"]
    x = images()
    pixels = ClipPreprocess(32, 32)(x)
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        tok = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
        txt = model.text_projection(model.text_model(**tok).pooler_output)
        cos = F.cosine_similarity(img, txt, dim=-1)
        head = AestheticHead(16)
        head.load_state_dict(torch.load(dirs["aesthetic"] / AESTHETIC_HEAD_FILE))
        aesthetic = head.eval()(F.normalize(img, dim=-1))[:, 0]
        got = {n: build_reward(n, weights=str(dirs[n]))(x, PROMPTS) for n in MODEL_REWARDS}
    torch.testing.assert_close(got["clip"], cos, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["hpsv2"], cos, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["pickscore"], model.logit_scale.exp() * cos, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["aesthetic"], aesthetic, rtol=1e-4, atol=1e-5)


def test_aesthetic_weight_layouts(dirs):
    x = images()
    ref = build_reward("aesthetic", weights=str(dirs["aesthetic"]))(x, PROMPTS)
    head, clip = dirs["aesthetic"] / AESTHETIC_HEAD_FILE, dirs["clip"]
    torch.testing.assert_close(build_reward("aesthetic", weights=f"{head},{clip}")(x, PROMPTS), ref)
    flat = dirs["root"] / "aesthetic_flat"  # head and CLIP files in one directory
    shutil.copytree(clip, flat)
    shutil.copy(head, flat / AESTHETIC_HEAD_FILE)
    torch.testing.assert_close(build_reward("aesthetic", weights=str(flat))(x, PROMPTS), ref)


def test_combined_model_and_weight_free(dirs):
    x = images()
    spec = "aesthetic:1,brightness:0.5,clip:2"
    reward = build_reward(spec, weights=f"aesthetic={dirs['aesthetic']};clip={dirs['clip']}")
    expected = (build_reward("aesthetic", weights=str(dirs["aesthetic"]))(x, PROMPTS)
                + 0.5 * build_reward("brightness")(x, PROMPTS)
                + 2 * build_reward("clip", weights=str(dirs["clip"]))(x, PROMPTS))
    torch.testing.assert_close(reward(x, PROMPTS), expected)
    with pytest.raises(UserError, match="one per reward"):
        build_reward(spec, weights=str(dirs["clip"]))


# --- preprocessing against transformers' processor --------------------------------------------------
def uint8_image(h, w, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([xx * 255 / w, yy * 255 / h, 128 + 100 * np.sin(xx / 7 + yy / 5)], -1)
    return np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("hw, size", [((300, 200), 224), ((97, 131), 224), ((224, 224), 224), ((512, 512), 224),
                                      ((64, 64), 32), ((130, 257), 32), ((20, 20), 32)])
def test_preprocessing_matches_clip_image_processor(hw, size):
    """Torch preprocessing vs CLIPImageProcessorPil (the default CLIPImageProcessor needs torchvision).

    Tolerance, in [0, 1] pixel units (normalisation undone): max 2/255, mean 0.5/255. Measured: max about
    1.07/255, mean 0.3/255 -- the PIL path rounds each resize pass to uint8, the torch path does not.
    """
    from transformers import CLIPImageProcessorPil

    a = uint8_image(*hw, seed=size + hw[0])
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    ref = processor(images=Image.fromarray(a), return_tensors="pt")["pixel_values"]
    pre = ClipPreprocess(size, size)
    with torch.no_grad():
        mine = pre(torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255)
    assert mine.shape == ref.shape
    diff = ((mine - ref) * pre.std).abs()
    assert diff.max().item() <= 2 / 255 and diff.mean().item() <= 0.5 / 255


def test_preprocessor_config_is_used(dirs):
    from transformers import CLIPImageProcessorPil

    d = dirs["root"] / "clip_with_processor"
    shutil.copytree(dirs["clip"], d)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                          image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25]).save_pretrained(d)
    reward = build_reward("clip", weights=str(d))
    assert reward.preprocess.size == 32
    torch.testing.assert_close(reward.preprocess.std.flatten(), torch.full((3,), 0.25))
    a = uint8_image(45, 60, seed=3)
    ref = CLIPImageProcessorPil.from_pretrained(d)(images=Image.fromarray(a), return_tensors="pt")["pixel_values"]
    mine = reward.preprocess(torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255)
    assert ((mine - ref) * 0.25).abs().max().item() <= 2 / 255


# --- open_clip conversion (HPS v2) ------------------------------------------------------------------
def test_open_clip_round_trip(dirs):
    model = dirs["model"]
    hf = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    oc = hf_to_open_clip(hf)
    assert oc["visual.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    assert oc["visual.proj"].shape == (32, 16) and oc["text_projection"].shape == (32, 16)
    assert oc["visual.conv1.weight"].shape == (32, 3, 8, 8) and oc["visual.positional_embedding"].shape == (17, 32)
    assert not any(k.startswith(("vision_model", "text_model")) for k in oc)
    back = open_clip_to_hf(oc)
    assert back.keys() == hf.keys()
    for k in hf:
        assert torch.equal(back[k], hf[k]), k
    config = config_from_open_clip(oc)
    for sub in ("vision_config", "text_config"):
        a, b = getattr(config, sub), getattr(model.config, sub)
        for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "projection_dim", "hidden_act"):
            assert getattr(a, field) == getattr(b, field), (sub, field)
    assert config.vision_config.image_size == 32 and config.vision_config.patch_size == 8
    assert config.text_config.vocab_size == model.config.text_config.vocab_size


def test_hpsv2_from_open_clip_checkpoint(dirs):
    x = images()
    ref = build_reward("hpsv2", weights=str(dirs["hpsv2"]))(x, PROMPTS)  # transformers directory
    for weights in (dirs["hps_pt"], dirs["hps_pt"] / "HPS_v2_compressed.pt"):
        reward = build_reward("hpsv2", weights=str(weights))
        torch.testing.assert_close(reward(x, PROMPTS), ref, rtol=1e-5, atol=1e-6)


def test_hpsv2_config_inferred_from_shapes(tmp_path, caplog):
    """Without config.json the heads are taken as 64 wide (open_clip's ViTs), and the log says so; a 1-head tiny
    model fits that."""
    model, tokenizer = tiny_clip(heads=1, seed=2)
    torch.save({"state_dict": {"module." + k: v for k, v in hf_to_open_clip(model.state_dict()).items()}},
               tmp_path / "HPS_v2.1_compressed.pt")
    tokenizer.save_pretrained(tmp_path)
    converted = load_open_clip_as_hf(hf_to_open_clip(model.state_dict()))
    x = images()
    with torch.no_grad():
        pix = ClipPreprocess(32, 32)(x)
        torch.testing.assert_close(converted.vision_model(pixel_values=pix).pooler_output,
                                   model.vision_model(pixel_values=pix).pooler_output)
        ids = tokenizer(PROMPTS, padding=True, truncation=True, max_length=16, return_tensors="pt")["input_ids"]
        torch.testing.assert_close(converted.text_model(input_ids=ids).pooler_output,
                                   model.text_model(input_ids=ids).pooler_output)
    import logging
    with caplog.at_level(logging.INFO, logger="lowmem_alignprop"):
        scores = build_reward("hpsv2", weights=str(tmp_path / "HPS_v2.1_compressed.pt"))(x, PROMPTS)
    assert "attention heads taken as 64 wide" in caplog.text
    img = F.normalize(model.get_image_features(pixel_values=pix).pooler_output, dim=-1)
    txt = F.normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1)
    torch.testing.assert_close(scores, (img * txt).sum(-1).detach(), rtol=1e-4, atol=1e-5)


# --- missing weights --------------------------------------------------------------------------------
@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LOWMEM_ALIGNPROP_CACHE", str(tmp_path / "cache"))


def _hub_cached(repo, filename):
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, filename), str)


@pytest.mark.parametrize("name, missing", [("aesthetic", AESTHETIC_HEAD_FILE), ("hpsv2", "HPS_v2.1_compressed.pt"),
                                           ("clip", "config.json"), ("pickscore", "config.json")])
def test_offline_without_weights(offline, name, missing):
    if name == "clip" and _hub_cached("openai/clip-vit-large-patch14", "config.json"):
        pytest.skip("the real CLIP is in this machine's Hugging Face cache")
    if name == "pickscore" and _hub_cached("yuvalkirstain/PickScore_v1", "config.json"):
        pytest.skip("PickScore is in this machine's Hugging Face cache")
    if name == "hpsv2" and _hub_cached("xswu/HPSv2", "HPS_v2.1_compressed.pt"):
        pytest.skip("HPS v2 is in this machine's Hugging Face cache")
    with pytest.raises(UserError) as err:
        build_reward(name)
    message = str(err.value)
    assert missing in message and "reward_weights" in message and "\n" not in message
    hub = {"clip": "openai/clip-vit-large-patch14", "pickscore": "yuvalkirstain/PickScore_v1"}
    if name in hub:  # the same download command as a model's hub id (models.hub_message)
        assert f"`hf download {hub[name]} --local-dir DIR`, then pass that DIR with --set reward_weights" in message


def test_incomplete_directories(dirs, tmp_path):
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    shutil.copy(dirs["clip"] / "config.json", only_config)
    with pytest.raises(UserError, match="model.safetensors"):
        build_reward("clip", weights=str(only_config))
    no_head = tmp_path / "no_head"
    shutil.copytree(dirs["clip"], no_head / "clip")
    with pytest.raises(UserError, match=AESTHETIC_HEAD_FILE.replace("+", r"\+")):
        build_reward("aesthetic", weights=str(no_head))
    with pytest.raises(UserError, match="does not exist"):
        build_reward("clip", weights=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="HPS_v2"):
        build_reward("hpsv2", weights=str(tmp_path / "no_head"))
    bad = tmp_path / "bad.pt"
    torch.save({"foo": torch.zeros(2)}, bad)
    with pytest.raises(UserError, match="open_clip"):
        build_reward("hpsv2", weights=str(bad))
    # a torch file with the head's first layer and nothing else: one line, not load_state_dict's traceback
    half = tmp_path / "half_head"
    shutil.copytree(dirs["clip"], half / "clip")
    torch.save({"layers.0.weight": torch.zeros(1024, 16)}, half / AESTHETIC_HEAD_FILE)
    with pytest.raises(UserError) as err:
        build_reward("aesthetic", weights=str(half))
    said = str(err.value)
    assert said.startswith(f"aesthetic reward: {half / AESTHETIC_HEAD_FILE} is not an aesthetic-predictor head "
                           "(Error(s) in loading state_dict for AestheticHead") and "\n" not in said


def test_weights_of_another_model_or_damaged_files_are_refused(dirs, tmp_path):
    """A text-only CLIP would load as a CLIPModel with random weights (transformers only logs it): refused."""
    from transformers import CLIPTextModel

    text_only = tmp_path / "text_only"
    CLIPTextModel(dirs["model"].config.text_config).save_pretrained(text_only)
    dirs["tokenizer"].save_pretrained(text_only)
    with pytest.raises(UserError, match="is not a full CLIP model \\(text and vision\\): [0-9]+ of its weights are "
                                        "missing"):
        build_reward("clip", weights=str(text_only))
    cut = tmp_path / "cut"
    shutil.copytree(dirs["clip"], cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cannot load the CLIP model in .*: its files are incomplete"):
        build_reward("pickscore", weights=str(cut))
    head = tmp_path / "head.safetensors"
    head.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(UserError, match="cannot read .*head.safetensors as a torch checkpoint"):
        build_reward("aesthetic", weights=f"{head},{dirs['clip']}")


def test_aesthetic_head_messages_name_the_candidates_or_the_clip_folder(dirs, tmp_path):
    two = tmp_path / "two_heads"
    two.mkdir()
    for name in ("a.pth", "b.pth"):
        torch.save(AestheticHead(16).state_dict(), two / name)
    with pytest.raises(UserError, match="holds several files that could be the head \\(a.pth, b.pth\\)"):
        build_reward("aesthetic", weights=str(two))
    with pytest.raises(UserError, match="it holds a CLIP model: put the head file beside it"):
        build_reward("aesthetic", weights=str(dirs["clip"]))  # a CLIP folder, not its model.safetensors as a head


def test_with_several_model_rewards_the_fix_names_the_missing_ones_entry(offline, dirs):
    if _hub_cached("openai/clip-vit-large-patch14", "config.json"):
        pytest.skip("the real CLIP is in this machine's Hugging Face cache")
    with pytest.raises(UserError, match=r"--set reward_weights='\.\.\.;clip=PATH'"):
        build_reward("aesthetic:1,clip:0.5", weights=f"aesthetic={dirs['aesthetic']}")


def test_hub_files_of_the_reward_models_come_from_the_local_hub_cache(tmp_path, monkeypatch):
    """HPSv2's checkpoint under either cached name, and a hub id's preprocessor_config.json, are read from the local
    hub cache without a request (offline here, as conftest sets it); nothing cached: None, and no error."""
    import json

    from huggingface_hub import constants

    from lowmem_alignprop.rewards import clip_rewards as cr

    def cache(repo: str, files: dict[str, str]):
        root = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
        for name, text in files.items():
            (root / "snapshots" / "abc" / name).parent.mkdir(parents=True, exist_ok=True)
            (root / "snapshots" / "abc" / name).write_text(text)
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text("abc")

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert cr._hub_hps_file() is None and cr._read_preprocessor(["someone/clip"]) is None
    cache(cr.HPS_HUB_REPO, {cr.HPS_FILES[1]: "v2"})  # the older name only
    assert cr._hub_hps_file().read_text() == "v2"
    cache("someone/clip", {"preprocessor_config.json": json.dumps({"crop_size": 224})})
    assert cr._read_preprocessor(["", "someone/not-cached", "someone/clip"]) == {"crop_size": 224}  # the next source


def test_a_cached_hub_id_without_tokenizer_files_takes_the_default_tokenizer(dirs, tmp_path, monkeypatch):
    """A hub CLIP whose repo has no tokenizer files (config.json and weights only) got an empty-vocabulary tokenizer
    from AutoTokenizer: every prompt became unknown tokens and the scores were wrong, in silence. It takes the
    reward's default tokenizer, as a folder without tokenizer files does; none cached: one line."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    bare = tmp_path / "bare"
    dirs["model"].save_pretrained(bare)  # config.json + model.safetensors, no tokenizer
    cached_snapshot(cache, "someone/pick-no-tokenizer", bare)
    with pytest.raises(UserError) as err:
        build_reward("pickscore", weights="someone/pick-no-tokenizer")
    assert str(err.value) == (
        "pickscore reward: no tokenizer files (tokenizer.json or vocab.json + merges.txt) found in "
        "someone/pick-no-tokenizer, laion/CLIP-ViT-H-14-laion2B-s32B-b79K; copy them into the weights directory "
        "given by --set reward_weights=PATH")
    laion = tmp_path / "laion"
    dirs["tokenizer"].save_pretrained(laion)
    dirs["model"].config.save_pretrained(laion)
    cached_snapshot(cache, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", laion)
    x = images()
    ref = build_reward("pickscore", weights=str(dirs["clip"]))(x, PROMPTS)  # the same model, its tokenizer at hand
    torch.testing.assert_close(build_reward("pickscore", weights="someone/pick-no-tokenizer")(x, PROMPTS), ref)


def test_hpsv2_from_a_folder_holding_an_open_clip_safetensors_file(dirs, tmp_path):
    """open_clip's hub releases are open_clip_model.safetensors: passed as a file it loaded, its folder was refused
    as 'missing HPS_v2.1_compressed.pt'."""
    from safetensors.torch import save_file

    sd = hf_to_open_clip(dirs["model"].state_dict())
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "open_clip_model.safetensors")
    dirs["tokenizer"].save_pretrained(tmp_path)
    dirs["model"].config.save_pretrained(tmp_path)
    x = images()
    ref = build_reward("hpsv2", weights=str(dirs["hpsv2"]))(x, PROMPTS)
    torch.testing.assert_close(build_reward("hpsv2", weights=str(tmp_path))(x, PROMPTS), ref, rtol=1e-5, atol=1e-6)
    torch.save(sd, tmp_path / "HPS_v2.1_ft.pt")  # a second candidate: which one is meant is asked, not guessed
    with pytest.raises(UserError) as err:
        build_reward("hpsv2", weights=str(tmp_path))
    assert str(err.value) == (
        f"hpsv2 reward: {tmp_path} holds several files that could be the HPS checkpoint (HPS_v2.1_ft.pt, "
        f"open_clip_model.safetensors): pass the one you mean, --set reward_weights={tmp_path / 'HPS_v2.1_ft.pt'}")


def test_plan_counts_a_hub_ids_own_clip_not_the_default_architecture(dirs, tmp_path, monkeypatch):
    """``plan`` builds a model reward on meta from its config: a hub id (cached here) was planned as the default
    ViT-L/14 whatever its config said (a ViT-bigG/14 counted as 1.6 GiB instead of about 10), an HPS file as
    ViT-H/14 though a config.json beside it says otherwise (which training reads). Both come from their
    config.json now; no weight is read."""
    from huggingface_hub import constants

    from lowmem_alignprop.measure.meta_models import meta_reward
    from lowmem_alignprop.settings.config import Config

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    (tmp_path / "cfg").mkdir()
    dirs["model"].config.save_pretrained(tmp_path / "cfg")  # config.json only: the plan needs no weights
    cached_snapshot(cache, "someone/custom-clip", tmp_path / "cfg")
    tiny = sum(p.numel() for p in dirs["model"].parameters())
    for reward, weights, where in [
            ("clip", "someone/custom-clip", "someone/custom-clip's config.json"),
            ("aesthetic", f"{dirs['aesthetic'] / AESTHETIC_HEAD_FILE},someone/custom-clip",
             "someone/custom-clip's config.json"),
            ("hpsv2", str(dirs["hps_pt"] / "HPS_v2_compressed.pt"), str(dirs["hps_pt"] / "config.json"))]:
        notes: list[str] = []
        module = meta_reward(Config(model="tiny", reward=reward, reward_weights=weights), torch.float32, notes)
        assert notes == [f"{reward}: CLIP from {where}"]
        counted = sum(p.numel() for n, p in module.named_parameters() if not n.startswith("head."))
        text = sum(p.numel() for n, p in dirs["model"].named_parameters() if n.startswith("text_"))
        assert counted == (tiny - text if reward == "aesthetic" else tiny), (reward, counted, tiny)
