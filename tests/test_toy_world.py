"""The toy world: renderer, caption grammar, train/held-out split and the exact evaluators agree.

Everything here is seeded (numpy's PCG64 streams and torch's CPU generator are the same on every machine), and
every statistical bound is stated with the distribution it comes from.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
from collections import Counter
from math import comb

import numpy as np
from pathlib import Path
import pytest
import torch
from numerics import REORDERED, SAME_OPS, assert_rel_close
from refusals import strict_rows

from lowmem_alignprop.toy import fidelity as fid
from lowmem_alignprop.toy.scenes import (
    ALL_PAIRS, BACKGROUNDS, COLOURS, HELD_OUT_PAIRS, MAX_OBJECTS, SHAPES, TRAIN_PAIRS, Content, Obj, Scene,
    all_contents, caption, content, heldout_prompts, make_content, parse_caption, render, render_batch,
    sample_scenes, split_of,
)

N_SCENES = 400  # rendered once per module; the evaluator reads them all in about a second


@pytest.fixture(scope="module")
def world():
    scenes = sample_scenes(N_SCENES, seed=123, split="all")
    images = render_batch(scenes)  # anti-aliased, float [B, 3, 64, 64]
    return scenes, images, fid.detect(images)


# ------------------------------------------------------------------------------------------- renderer

def test_renderer_is_deterministic_per_seed():
    a, b = sample_scenes(12, seed=5), sample_scenes(12, seed=5)
    assert a == b
    assert all(np.array_equal(render(x), render(y)) for x, y in zip(a, b))
    # a scene is addressable alone: scene i of the stream does not depend on the draws before it
    assert sample_scenes(1, seed=5, start=7) == a[7:8]
    assert sample_scenes(12, seed=6) != a
    assert sample_scenes(12, seed=5, split="heldout") != sample_scenes(12, seed=5, split="train")


def test_renderer_draws_what_the_scene_says():
    """Checked without the evaluator: the centre pixel of each object has its colour exactly, the corners are
    background, and an object's anti-aliased pixel count is its exact area (rounded per pixel)."""
    scene = Scene((Obj("square", "red", 0.3, 0.3, 0.25), Obj("circle", "blue", 0.7, 0.7, 0.25),
                   Obj("triangle", "green", 0.3, 0.75, 0.25), Obj("diamond", "yellow", 0.75, 0.25, 0.25)),
                  "white")
    img = render(scene, 64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    for o in scene.objects:
        cy, cx = int(o.y * 64), int(o.x * 64)
        assert tuple(img[cy, cx]) == COLOURS[o.colour]
    for y, x in ((0, 0), (0, 63), (63, 0), (63, 63)):
        assert tuple(img[y, x]) == BACKGROUNDS["white"]
    # the square is 16 px on a side: 256 px of coverage, whatever its sub-pixel offset
    red = np.array(COLOURS["red"], float)
    white = np.array(BACKGROUNDS["white"], float)
    d = red - white
    cover = ((img[:32, :32].astype(float) - white) @ d) / (d @ d)
    # 4x4 supersampling counts exactly 64 x 64 sample points in a 16 px square; storing uint8 moves each
    # channel by <= 1/2 level, so each pixel's coverage by <= |d|_1 / 2 / |d|^2
    assert cover.sum() == pytest.approx(256, abs=32 * 32 * 0.5 * np.abs(d).sum() / (d @ d))
    # without anti-aliasing every pixel is a palette colour
    flat = render(scene, 64, antialias=False).reshape(-1, 3)
    palette = {tuple(c) for c in COLOURS.values()} | {BACKGROUNDS["white"]}
    assert {tuple(p) for p in flat} <= palette


def test_render_batch_is_the_trainer_format():
    scenes = sample_scenes(3, seed=1)
    batch = render_batch(scenes, size=32)
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == torch.float32
    assert 0 <= batch.min() and batch.max() <= 1
    assert torch.equal((batch[1] * 255).round().byte().permute(1, 2, 0), torch.from_numpy(render(scenes[1], 32)))


def test_scenes_stay_inside_the_frame_and_apart():
    from lowmem_alignprop.toy.scenes import GAP, MARGIN
    for s in sample_scenes(300, seed=2, split="all"):
        assert 1 <= len(s.objects) <= MAX_OBJECTS
        for o in s.objects:
            x0, y0, x1, y1 = o.box()
            assert MARGIN - 1e-12 <= min(x0, y0) and max(x1, y1) <= 1 - MARGIN + 1e-12
        for p, q in itertools.combinations(s.objects, 2):
            (a0, b0, a1, b1), (c0, d0, c1, d1) = p.box(), q.box()
            assert max(c0 - a1, a0 - c1, d0 - b1, b0 - d1) >= GAP - 1e-12


# ------------------------------------------------------------------------------------------- grammar

def test_caption_examples():
    assert parse_caption("two red circles") == make_content([("red", "circle")] * 2)
    assert parse_caption("a blue square and a yellow triangle on a white background") == \
        make_content([("blue", "square"), ("yellow", "triangle")], "white")
    # any order, "one", an Oxford comma, capitals, a full stop, repeated groups
    assert parse_caption("A yellow triangle, one blue square, and a blue square.") == \
        make_content([("blue", "square")] * 2 + [("yellow", "triangle")])
    assert caption(make_content([("orange", "diamond"), ("red", "circle"), ("orange", "diamond")], "gray")) == \
        "a red circle and two orange diamonds on a gray background"
    assert caption(make_content([("orange", "circle")])) == "an orange circle"
    five = make_content([("red", "circle")] * 5)  # beyond the count words (a detection can find 5): a numeral
    assert caption(five) == "5 red circles" and parse_caption(caption(five)) == five
    for bad in ("two red circle", "a red circles", "a red hexagon", "a pink circle", "red circles", "",
                "a red circle on a pink background", "a red circle and", "0 red circles", "5 red circle"):
        with pytest.raises(ValueError):
            parse_caption(bad)
    assert len(parse_caption("4096 red circles").objects) == 4096  # one per pixel of a 64 px image: the most
    with pytest.raises(ValueError, match=r"^count 99999999999 in '99999999999 red circles' is more than a 64 px image "
                                         r"holds \(4096\)$"):  # (a list that long: out of memory, from one prompt)
        parse_caption("99999999999 red circles")


def test_caption_round_trip():
    for s in sample_scenes(500, seed=3, split="all"):
        assert parse_caption(caption(s)) == content(s)
        expected_bg = s.background if s.mention_background else None
        assert parse_caption(caption(s)) == make_content([(o.colour, o.shape) for o in s.objects], expected_bg)
    # one caption per content: captions of the whole space up to 3 objects are distinct and parse back
    space = list(all_contents(max_objects=3))
    captions = [caption(c) for c in space]
    assert len(set(captions)) == len(space)
    assert all(parse_caption(t) == c for t, c in zip(captions, space))


# ------------------------------------------------------------------------------------------- split

def _multisets(n_types: int, max_size: int) -> int:
    return sum(comb(n_types + k - 1, k) for k in range(1, max_size + 1))


def test_heldout_split_is_disjoint_from_training():
    # the caption space partitions: exactly the multisets over the 20 training pairs are 'train'
    space = list(all_contents(max_objects=3))
    n_bg = len(BACKGROUNDS) + 1  # or none
    assert len(space) == _multisets(len(ALL_PAIRS), 3) * n_bg
    assert sum(split_of(c) == "train" for c in space) == _multisets(len(TRAIN_PAIRS), 3) * n_bg
    # samplers: no training caption holds a held-out pair, every held-out caption holds one
    train = {caption(s) for s in sample_scenes(2000, seed=4, split="train")}
    held = {caption(s) for s in sample_scenes(500, seed=4, split="heldout")}
    assert not train & held
    assert all(not set(parse_caption(t).objects) & HELD_OUT_PAIRS for t in train)
    assert all(set(parse_caption(t).objects) & HELD_OUT_PAIRS for t in held)
    assert all(split_of(t) == "train" for t in train) and all(split_of(t) == "heldout" for t in held)
    # training still sees every colour, every shape and every other pair; the held-out stream every held-out pair
    train_pairs = {p for t in train for p in parse_caption(t).objects}
    assert train_pairs == set(TRAIN_PAIRS)
    assert {c for c, _ in train_pairs} == set(COLOURS) and {s for _, s in train_pairs} == set(SHAPES)
    assert HELD_OUT_PAIRS <= {p for t in held for p in parse_caption(t).objects}
    # held out: uniform over the lists that hold a held-out pair, so a scene of n objects holds held-out pairs only
    # with chance (4/24)^n / (1 - (20/24)^n) (n = 2: 9%, 3: 1%): nearly all mix a new pair with known ones
    multi = [s for s in sample_scenes(500, seed=4, split="heldout") if len(s.objects) > 1]
    mixed = sum(any((o.colour, o.shape) in TRAIN_PAIRS for o in s.objects) for s in multi) / len(multi)
    assert 0.93 <= mixed <= 0.99, mixed
    prompts = heldout_prompts(20, seed=0)
    assert len(set(prompts)) == 20 and all(split_of(t) == "heldout" for t in prompts)
    assert prompts == heldout_prompts(20, seed=0)


# ------------------------------------------------------------------------------------------- evaluators

def test_fidelity_is_perfect_on_the_renderers_own_scenes(world):
    scenes, images, dets = world
    results = [fid.compare(content(s), d.content) for s, d in zip(scenes, dets)]
    wrong = [(caption(s), d.content) for s, d, r in zip(scenes, dets, results) if not r.all_ok]
    assert not wrong, wrong[:3]
    assert all(r.score == 1.0 for r in results)
    # the sample covers the world: every pair, count and background (so the 100% is over all of them)
    assert {(o.colour, o.shape) for s in scenes for o in s.objects} == set(ALL_PAIRS)
    assert {len(s.objects) for s in scenes} == set(range(1, MAX_OBJECTS + 1))
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    # the background is read even where the caption does not name it
    assert all(d.background == s.background for s, d in zip(scenes, dets))


def test_fidelity_without_antialiasing_and_from_uint8():
    scenes = sample_scenes(100, seed=77, split="all")
    u8 = np.stack([render(s, antialias=False) for s in scenes])  # [B, H, W, 3] uint8
    res = fid.fidelity(u8, [caption(s) for s in scenes])
    assert all(r.all_ok for r in res)
    # every input form reads the same: float batch, one float image, one uint8 image, PIL, a list
    from PIL import Image
    one = render(scenes[0])
    as_float = torch.from_numpy(one).permute(2, 0, 1).float() / 255
    forms = [one, as_float, as_float[None], Image.fromarray(one), [one]]
    assert len({fid.detect(f)[0].content for f in forms}) == 1


def test_fidelity_survives_pixel_noise():
    """Gaussian noise of sd 0.04 (10 levels of 255) per channel: a pixel leaves its colour's blend line by more
    than RESIDUAL_MAX = 40 with probability exp(-40^2 / (2 * 10.2^2)) < 1e-3 and crosses half-way to another
    colour (>= 40 levels from the background along the line) about as rarely, so objects keep their shape."""
    scenes = sample_scenes(100, seed=8, split="all")
    images = render_batch(scenes)
    noisy = (images + 0.04 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert all(r.all_ok for r in fid.fidelity(noisy, [caption(s) for s in scenes]))


def test_fidelity_notices_a_missing_object():
    scene = sample_scenes(1, seed=9, n_objects=3)[0]
    fewer = Scene(scene.objects[:2], scene.background)
    r = fid.fidelity(render_batch([fewer]), caption(scene))[0]
    assert not r.count_ok and not r.objects_ok and not r.all_ok and r.score < 1
    assert r.detected.count == 2
    assert fid.summarize([r])["objects"] == 2.0  # the mean count the images show, not the caption's 3


def test_each_check_compares_multisets_and_all_ok_needs_the_background():
    """Two red circles and a blue square read as a red circle, a blue circle and a blue square: the colours differ as
    multisets (the same as sets); a caption's background read wrong fails all_ok (4 of 5 checks right)."""
    want = make_content([("red", "circle"), ("red", "circle"), ("blue", "square")], "white")
    colours = fid.compare(want, make_content([("red", "circle"), ("blue", "circle"), ("blue", "square")], "white"))
    assert (colours.count_ok, colours.colours_ok, colours.shapes_ok, colours.objects_ok) == (True, False, True, False)
    shapes = fid.compare(want, make_content([("red", "circle"), ("red", "square"), ("blue", "square")], "white"))
    assert (shapes.count_ok, shapes.colours_ok, shapes.shapes_ok, shapes.objects_ok) == (True, True, False, False)
    assert colours.score == shapes.score == 0.6
    background = fid.compare(want, make_content(want.objects, "black"))
    assert (background.objects_ok, background.background_ok, background.all_ok, background.score) == \
        (True, False, False, 0.8)
    unnamed = fid.compare(Content(want.objects, None), make_content(want.objects, "black"))
    assert (unnamed.all_ok, unnamed.score) == (True, 1.0)
    assert fid.summarize([colours, background, unnamed])["all_ok"] == pytest.approx(1 / 3)


def test_the_judged_images_go_round_the_prompts_to_the_asked_number():
    """fidelity_images=12 of 5 prompts: 12 images, the prompts in order and round again (10 were judged: the report
    said 12); none outside the toy world, and a run of one's own model is in it only when every prompt parses."""
    five = heldout_prompts(5)
    assert fid.judged_prompts("toy", five, 12) == five + five + five[:2]
    assert fid.judged_prompts("toy", five, 0) == [] and fid.judged_prompts("tiny", five, 3) == five[:3]
    assert fid.judged_prompts("tiny", [five[0], "a photo of a cat"], 8) == []
    assert not fid.applies("tiny", [five[0], "a photo of a cat"]) and fid.applies("toy", ["a photo of a cat"])


def test_a_blob_below_the_smallest_objects_area_is_dust():
    """A solid 4x4 blob (16 px) is under 40% of the smallest drawn object (0.5 x 10.24^2 = 52 px at 64 px: 21 px)
    and is no object; a 6x6 one (36 px) is: the count of a decoder's speckled image depends on it."""
    scene = Scene((Obj("circle", "blue", 0.3, 0.3, 0.3),), "white")
    counts = []
    for side in (4, 6):
        img = render(scene).copy()
        img[44:44 + side, 44:44 + side] = COLOURS["red"]
        counts.append(fid.detect(img)[0].content.count)
    assert counts == [1, 2]


def _chance_same_multiset(n_types: int) -> float:
    """P(two independent scenes have the same multiset of one attribute), the sampler drawing the count
    uniformly in 1..4 and each object's value uniformly among n_types: sum over counts k of P(k)^2 times
    sum over multisets m of size k of P(m | k)^2, P(m | k) = multinomial(k; m) / n_types^k."""
    total = 0.0
    for k in range(1, MAX_OBJECTS + 1):
        same = 0.0
        for m in itertools.combinations_with_replacement(range(n_types), k):
            mult = math.factorial(k)
            for c in Counter(m).values():
                mult //= math.factorial(c)
            same += (mult / n_types ** k) ** 2
        total += (1 / MAX_OBJECTS) ** 2 * same
    return total


def test_fidelity_on_shuffled_captions_is_at_chance(world):
    """Each image is scored against the caption of an independent scene of the same distribution. Per image
    the evaluator must give exactly the truth (the two scenes' contents compared); over the batch each rate
    is Binomial(N, p) / N with p computed from the sampler, within 5 standard deviations."""
    scenes, _, dets = world
    others = sample_scenes(N_SCENES, seed=321, split="all")
    results = [fid.compare(content(o), d.content) for o, d in zip(others, dets)]
    truth = [fid.compare(content(o), Content(content(s).objects, s.background)) for o, s in zip(others, scenes)]
    assert results == truth
    chance = {
        "count_ok": 1 / MAX_OBJECTS,
        "colours_ok": _chance_same_multiset(len(COLOURS)),
        "shapes_ok": _chance_same_multiset(len(SHAPES)),
        "objects_ok": _chance_same_multiset(len(ALL_PAIRS)),
        # the caption names a background half the time, the right one a third of the time
        "background_ok": 0.5 + 0.5 / len(BACKGROUNDS),
    }
    chance["all_ok"] = chance["objects_ok"] * chance["background_ok"]  # independent draws
    rates = fid.summarize(results)
    for key, p in chance.items():
        sd = math.sqrt(p * (1 - p) / N_SCENES)
        assert abs(rates[key] - p) <= 5 * sd, (key, rates[key], p, sd)
    # and the own captions score far above it
    assert fid.summarize([fid.compare(content(s), d.content) for s, d in zip(scenes, dets)])["all_ok"] == 1.0


# ------------------------------------------------------------------------------------------- JPEG size

def test_jpeg_size_is_the_real_file_size():
    from PIL import Image
    img = render(sample_scenes(1, seed=10)[0])
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95, subsampling=2)
    assert fid.jpeg_sizes(img) == [len(buf.getvalue())]
    decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
    assert decoded.shape == img.shape  # a real, decodable JPEG of the image
    as_float = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    assert fid.jpeg_sizes(as_float) == fid.jpeg_sizes(img)
    assert fid.jpeg_sizes(img, quality=50)[0] < fid.jpeg_sizes(img, quality=95)[0]


def test_jpeg_size_grows_with_objects_and_noise():
    scenes = sample_scenes(40, seed=12, n_objects=4, split="all")
    by_count = []
    for k in range(0, MAX_OBJECTS + 1):
        prefix = [Scene(s.objects[:k], s.background) for s in scenes]
        by_count.append(float(np.mean(fid.jpeg_sizes(render_batch(prefix)))))
    assert all(a < b for a, b in zip(by_count, by_count[1:])), by_count
    images = render_batch(scenes)
    gen = torch.Generator().manual_seed(1)
    by_noise = [float(np.mean(fid.jpeg_sizes((images + s * torch.randn(images.shape, generator=gen)).clamp(0, 1))))
                for s in (0.0, 0.02, 0.08)]
    assert by_noise[0] < by_noise[1] < by_noise[2], by_noise


# ------------------------------------------------------------------------------------------- toy model training

def test_tokenizer_makes_each_grammar_word_one_token(tmp_path):
    from transformers import CLIPTokenizer

    from lowmem_alignprop.toy.tokenizer import MAX_LENGTH, build_tokenizer, grammar_words

    tok = build_tokenizer()
    for w in grammar_words():
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    longest = "a red circle, a red square, a red triangle and a red diamond on a white background"
    ids = tok(longest).input_ids
    assert len(ids) == 19 + 2 <= MAX_LENGTH
    assert tok.convert_ids_to_tokens(ids)[1:4] == ["a</w>", "red</w>", "circle</w>"]
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    assert again(longest).input_ids == ids
    assert len(tok("a pink hexagon").input_ids) > 5  # unknown words still tokenize, by bytes


TINY_SCHEDULE = dict(vae_steps=2, vae_batch=4, pool=8, unet_steps=2, unet_batch=4, clip_steps=2, count_steps=2,
                     reward_batch=8, recon_pool=8, eval_samples=4, sample_steps=2, gen_samples=8, robust_clip_steps=2,
                     robust_count_steps=2)


@pytest.fixture
def one_thread():
    """Tiny models on a shared CPU: one thread avoids oversubscription stalls (10x slower on a busy machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_train_world_writes_loadable_weights(tmp_path, one_thread):
    import hashlib
    import json

    from diffusers import StableDiffusionPipeline

    from lowmem_alignprop.rewards.toy import load_toy_clip, load_toy_count
    from lowmem_alignprop.commands.train_toy_world import TRAIN_VERSION, Schedule, train_world

    lines = []
    report = train_world(tmp_path, seed=0, schedule=Schedule(**TINY_SCHEDULE), threads=1, log=lines.append)
    assert any(line.startswith("unet 2/2 loss") for line in lines)
    # the text-to-image model loads by path like any diffusers directory and samples
    from lowmem_alignprop.models.loading import dtype_kwarg

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "model", **dtype_kwarg(torch.float32))  # saved in fp16
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.dtype == torch.float32 and pipe.vae.config.scaling_factor == report["vae_scaling_factor"] > 0
    assert pipe.tokenizer.model_max_length == 24
    out = pipe(["two red circles"], height=64, width=64, num_inference_steps=2, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
    assert len(fid.fidelity(out, "two red circles")) == 1
    # ... and through this package's own loader, as `--model DIR` loads it (model checks included)
    from lowmem_alignprop.settings.config import Config
    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.models.sampling import encode_prompts, make_pipeline, resolution_note

    comps = load_components(Config(model=str(tmp_path / "model"), resolution=64))
    embeds = encode_prompts(make_pipeline(comps), ["two red circles"], "cpu", 64)
    assert embeds.cond.shape == (1, 24, 64) and resolution_note(comps.unet, comps.vae, 64) is None
    # the rewards load as frozen RewardModules, differentiable w.r.t. the images
    images = render_batch(sample_scenes(2, seed=0)).requires_grad_(True)
    clip = load_toy_clip(tmp_path / "rewards" / "toy_clip")
    count = load_toy_count(tmp_path / "rewards" / "toy_count", target=3)
    score = clip(images, ["two red circles", "a blue square"]) + count(images)
    assert score.shape == (2,)
    score.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in clip.parameters())
    # the report records the versions, the seed and each file's checksum
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["train_version"] == TRAIN_VERSION and saved["seed"] == 0 and saved["reproducible"]
    assert 0 < saved["cpu_seconds"] and saved["wall_seconds"]["total"] > 0
    files = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() and p.name != "report.json"}
    assert set(saved["sha256"]) == files
    assert "model/unet/diffusion_pytorch_model.safetensors" in files
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model" / "text_encoder" / "model.safetensors"), "pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())  # the hub's layout: every transformers 5 reads it
    for name, digest in saved["sha256"].items():
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == digest
    assert 0 <= saved["samples_heldout"]["all_ok"] <= 1 and "toy_count_accuracy" in saved["rewards_on_renders"]


def test_the_toy_trainers_learning_rate_warms_up_to_the_base_then_falls_as_a_cosine():
    """train_toy_world.cosine_lr: warm-up step i (of w) trains at base * (i + 1) / w (its first step not at 0, its
    last at the base), then half a cosine from the base over the remaining steps."""
    from lowmem_alignprop.commands.train_toy_world import cosine_lr

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)

    def lr(step: int) -> float:
        cosine_lr(opt, step, 14, 0.8, warmup=4)
        return opt.param_groups[0]["lr"]

    assert [lr(i) for i in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert [lr(i) for i in (4, 9, 13)] == pytest.approx([0.8, 0.4, 0.8 * 0.5 * (1 + math.cos(math.pi * 0.9))])


def test_train_world_is_seeded(tmp_path, one_thread):
    """Same seed, same software, same machine: the same bytes in every weight file; another seed: others."""
    import json

    from lowmem_alignprop.commands.train_toy_world import Schedule, main, train_world

    digests = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        train_world(tmp_path / name, seed=seed, schedule=Schedule(**TINY_SCHEDULE), threads=1,
                    evaluate_samples=False, log=lambda _: None)
        digests.append(json.loads((tmp_path / name / "report.json").read_text())["sha256"])
    assert digests[0] == digests[1]
    weights = [k for k in digests[0] if k.endswith(".safetensors")]
    assert len(weights) == 5  # unet, vae, text encoder, toy_clip, toy_count
    assert all(digests[0][k] != digests[2][k] for k in weights)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0


def test_rewards_only_from_a_trained_directory_gives_the_full_runs_rewards(tmp_path, one_thread):
    """--rewards-only --from DIR runs phases 5-6 (the rewards on the model's own samples) on DIR's model and phase 3-4
    rewards: the same bytes as a full run, whose phases 5-6 start from the same saved fp16 files; the model is copied
    unchanged and the report says where phases 1-4 came from."""
    from lowmem_alignprop.commands.train_toy_world import Schedule, main, train_world

    quiet = dict(seed=2, threads=1, evaluate_samples=False, log=lambda _: None)
    full = train_world(tmp_path / "full", schedule=Schedule(**TINY_SCHEDULE), **quiet)
    assert full["generated_pool"]["images"] == TINY_SCHEDULE["gen_samples"]
    # gen_samples=0: phases 1-4 alone (what a train_version 1 run wrote)
    first = train_world(tmp_path / "first", schedule=Schedule(**{**TINY_SCHEDULE, "gen_samples": 0}), **quiet)
    assert "generated_pool" not in first
    model = {k: v for k, v in full["sha256"].items() if k.startswith("model/")}
    assert {k: v for k, v in first["sha256"].items() if k.startswith("model/")} == model
    weights = ("rewards/toy_clip/model.safetensors", "rewards/toy_count/model.safetensors")
    assert all(first["sha256"][w] != full["sha256"][w] for w in weights)  # phases 5-6 moved both rewards
    lines = []
    only = train_world(tmp_path / "only", schedule=Schedule(**TINY_SCHEDULE), rewards_from=tmp_path / "first",
                       **{**quiet, "log": lines.append})
    assert only["sha256"] == full["sha256"]
    assert only["phases_1_4_from"]["sha256"] == first["sha256"] and only["generated_pool"] == full["generated_pool"]
    assert any(line.startswith("robust_clip 2/2 loss") for line in lines)
    for bad in (["--from", str(tmp_path / "first")],  # --from needs --rewards-only
                ["--rewards-only"]):  # ... which needs --gen-samples N
        with pytest.raises(SystemExit) as exit_info:
            main(["--out", str(tmp_path / "x")] + bad)
        assert exit_info.value.code == 2
    assert not (tmp_path / "x").exists()


def test_evaluate_batch_judges_only_the_grammars_prompts():
    from lowmem_alignprop.toy.scenes import train_prompts

    scenes = sample_scenes(6, seed=13, split="all")
    images = render_batch(scenes)
    prompts = [caption(s) for s in scenes]
    prompts[1] = "a photo of a cat"  # outside the grammar: not judged
    prompts[2] = caption(sample_scenes(1, seed=14, n_objects=4)[0]) if len(scenes[2].objects) != 4 else \
        caption(sample_scenes(1, seed=14, n_objects=1)[0])  # wrong count: judged wrong
    m = fid.evaluate_batch(images, prompts)
    assert m["fidelity_images"] == 5
    assert m["fidelity_all_ok"] == pytest.approx(4 / 5) and m["fidelity_count_ok"] == pytest.approx(4 / 5)
    assert m["jpeg_bytes"] == pytest.approx(np.mean(fid.jpeg_sizes(images)))
    assert "fidelity_all_ok" not in fid.evaluate_batch(images[:2], ["a cat", "a dog"])
    with pytest.raises(ValueError, match="no images to evaluate"):  # not a NaN JPEG size
        fid.evaluate_batch(images[:0], [])
    with pytest.raises(ValueError, match="divide 0-255 values by 255"):  # not read as a blank white image
        fid.evaluate_batch(images[:1] * 255.0, prompts[:1])
    train = train_prompts(30, seed=0)
    assert len(set(train)) == 30 and all(split_of(p) == "train" for p in train)


from lowmem_alignprop.toy.scenes import train_prompts  # noqa: E402

SHIPPED = Path(__file__).resolve().parents[1] / "lowmem_alignprop" / "toy" / "weights"


def test_shipped_weights_are_the_recorded_run_and_draw_the_scenes_they_are_asked_for(one_thread):
    """The weights in the package are the script's full run (version, seed and every file's checksum recorded in
    report.json), load through this package's loader, and are a real model, not noise: sampled from training
    prompts, the exact evaluator finds the right number of objects far above chance (1/4), the right colours and the
    whole scene right far above chance (1.6% and 0.2%), and the right background nearly always. (The run measured
    count 54%, background 92%, colours 41%, all right 21% on 256 samples; over 64 samples the bounds are 3 standard
    deviations below those rates, so another CPU's other draw still passes.)"""
    import hashlib
    import json

    from lowmem_alignprop.settings.config import Config
    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.commands.train_toy_world import TRAIN_VERSION

    report = json.loads((SHIPPED / "report.json").read_text())
    assert report["train_version"] == TRAIN_VERSION and report["seed"] == 0 and report["scale"] == 1.0
    for name, digest in report["sha256"].items():
        assert hashlib.sha256((SHIPPED / name).read_bytes()).hexdigest() == digest, name
    comps = load_components(Config(model=str(SHIPPED / "model"), resolution=64))
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=comps.vae.float(), text_encoder=comps.text_encoder.float(),
                                   tokenizer=comps.tokenizer, unet=comps.unet.float(), scheduler=comps.scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompts = train_prompts(64, seed=1)
    images = pipe(prompts, height=64, width=64, num_inference_steps=20, guidance_scale=3.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    rates = fid.evaluate_batch(images, prompts)
    print("shipped toy model, 64 training prompts:", rates)
    assert rates["fidelity_images"] == 64, rates
    # each bound is the run's rate (256 samples) less 3 binomial sd over 64: p - 3 sqrt(p (1 - p) / 64)
    stated = {"count_ok": 0.54, "background_ok": 0.92, "colours_ok": 0.41, "all_ok": 0.21}
    for key, p in stated.items():
        bound = p - 3 * math.sqrt(p * (1 - p) / 64)  # count 0.35, background 0.82, colours 0.23, all right 0.06
        assert rates[f"fidelity_{key}"] >= bound, (key, bound, rates)
    assert rates["fidelity_all_ok"] > 20 * 0.0019  # chance for all right (test_fidelity_on_shuffled_captions...)


# ------------------------------------------------------------------------------------------- wiring: --model toy

def test_toy_is_the_default_model_with_its_own_sampler_reward_and_prompts(monkeypatch):
    """No flags: the toy world (the suite itself sets LOWMEM_ALIGNPROP_MODEL=tiny, see conftest.py). The toy model's
    size and sampler beat a profile's; flags and --set beat them; a GPU profile's K range ends at its 20 steps."""
    from lowmem_alignprop.models.loading import TOY_MODEL_DIR, resolve_model
    from lowmem_alignprop.settings.config import MODEL_ENV, Config
    from lowmem_alignprop.settings.profiles import resolve_config

    monkeypatch.delenv(MODEL_ENV)
    assert Config().model == "toy"
    assert resolve_model("toy") == ("dir", str(TOY_MODEL_DIR))
    _, cfg = resolve_config("cpu", {}, [])
    assert (cfg.model, cfg.resolution, cfg.sample_steps, cfg.guidance_scale, cfg.reward, cfg.prompts, cfg.batch_size) \
        == ("toy", 64, 20, 3.0, "toy_clip", "toy-pairs", 4)
    _, cfg = resolve_config("rtx3060", {"model": "toy", "reward": "brightness"}, ["sample_steps=10"])
    assert (cfg.resolution, cfg.sample_steps, cfg.reward, cfg.k_max) == (64, 10, "brightness", 10)
    _, cfg = resolve_config("cpu", {"model": "tiny"}, [])
    assert (cfg.resolution, cfg.sample_steps, cfg.reward, cfg.prompts) == (64, 10, "brightness", "simple_animals")


def test_toy_model_loads_in_float32_with_the_grammars_tokenizer():
    from lowmem_alignprop.models.loading import load_components
    from lowmem_alignprop.settings.config import Config
    from lowmem_alignprop.toy.tokenizer import build_tokenizer, grammar_words

    comps = load_components(Config(model="toy", resolution=64))  # fp16 on disk
    assert {p.dtype for m in (comps.unet, comps.vae, comps.text_encoder) for p in m.parameters()} == {torch.float32}
    made = build_tokenizer()  # the shipped tokenizer is the one the code makes
    text = " ".join(grammar_words()) + " a pink hexagon"
    assert comps.tokenizer(text).input_ids == made(text).input_ids
    assert comps.tokenizer.model_max_length == made.model_max_length == 24


def test_plan_accepts_the_toy_model(capsys):
    import json

    from lowmem_alignprop.cli import main

    assert main(["plan", "--profile", "cpu", "--model", "toy", "--json", "--no-suggest"]) == 0  # the laptop's plan
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"] == "toy" and plan["reward"] == "toy_clip" and plan["fits"], plan
    assert 0 < plan["peak_allocated"] < 2**30  # a 2.5 M-parameter model at 64 px


def test_toy_prompt_sets_are_the_grammars_split():
    from lowmem_alignprop.step.prompts import PROMPT_SETS, load_prompts

    train, held = load_prompts("toy-train"), load_prompts("toy-heldout")
    assert {"toy-train", "toy-heldout", "toy-pairs"} <= set(PROMPT_SETS)
    assert {parse_caption(p).objects for p in load_prompts("toy-pairs")} == {(pair,) for pair in HELD_OUT_PAIRS}
    assert len(set(train)) == len(set(held)) == 64
    assert all(split_of(p) == "train" for p in train) and all(split_of(p) == "heldout" for p in held)


def test_toy_rewards_are_registered_and_know_the_world():
    """On rendered scenes: toy_clip scores an image's own caption above a caption with one object's colour changed
    (the full run measured 94% against any one edit); toy_count=N is highest at N objects. Both combine like any
    built-in, and a target the counter cannot count fails before any model loads."""
    from lowmem_alignprop.rewards import REWARDS, build_reward, check_reward_spec
    from lowmem_alignprop.settings.errors import UserError

    assert {"toy_clip", "toy_count"} <= set(REWARDS)
    scenes = sample_scenes(48, seed=31, split="all")
    images = render_batch(scenes)
    clip = build_reward("toy_clip")
    own = clip(images, [caption(s) for s in scenes])
    recoloured = []
    for s in scenes:
        o = s.objects[0]
        other = next(c for c in COLOURS if c != o.colour)
        recoloured.append(caption(Scene((Obj(o.shape, other, o.x, o.y, o.size),) + s.objects[1:], s.background,
                                        s.mention_background)))
    assert (own > clip(images, recoloured)).float().mean() >= 0.8
    by_count = [sample_scenes(16, seed=32, n_objects=n, split="all") for n in range(1, 5)]
    for target in (1, 3):
        count = build_reward(f"toy_count={target}")
        means = [count(render_batch(group)).mean().item() for group in by_count]
        assert max(range(4), key=means.__getitem__) + 1 == target, means
    mixed = build_reward("toy_clip:1,toy_count=3:0.5")
    expected = clip(images, [caption(s) for s in scenes]) + 0.5 * build_reward("toy_count=3")(images)
    assert_rel_close(mixed(images, [caption(s) for s in scenes]), expected, SAME_OPS, "toy_clip:1,toy_count=3:0.5")
    for bad in ("toy_count=5", "toy_count=x", "toy_count=-1"):
        with pytest.raises(UserError, match="from 0 to 4"):
            check_reward_spec(bad)


@pytest.fixture(scope="module")
def short_toy_run(tmp_path_factory):
    """Two steps on the shipped toy model, judged every step on 4 images (DDIM 4 steps: the wiring, not learning),
    with an EMA of the LoRA (its outputs the EMA's) and the held-out evaluation every step beside the judging (on
    two of toy-heldout's scenes: its 62 took 14 s of the fixture)."""
    from lowmem_alignprop.cli import main

    root = tmp_path_factory.mktemp("toy")
    (root / "eval.txt").write_text("an orange triangle, a blue diamond and a purple circle\n"
                                   "an orange diamond, a green circle, a green diamond and a blue diamond\n")
    out = root / "run"
    assert main(["--model", "toy", "--profile", "cpu", "--output-dir", str(out), "--steps", "2", "--set",
                 "sample_steps=4", "--set", "fidelity_images=4", "--set", "fidelity_every=1", "--set",
                 "sample_prompts=1", "--set", "ema_decay=0.5", "--eval-every", "1", "--set",
                 f"eval_prompts={root / 'eval.txt'}", "--set", "best_by=fidelity"]) == 0
    return out


# which call of each runs out of memory: 1 is before training, 2 and 3 steps 1 and 2, 4 after training (the sample
# grid's after images reuse step 2's render when it succeeded: that one fails too, for the after render to be made)
@pytest.mark.parametrize("fail", [{"judge": 2, "samples": 2}, {"samples": 1, "judge": 4},
                                  {"judge": 1, "samples": (3, 4)}],
                         ids=["in-training", "samples-before-judge-after", "judge-before-samples-after"])
def test_out_of_memory_while_judging_or_sampling_skips_them_and_the_run_goes_on(tmp_path, monkeypatch, caplog, fail):
    """The exact evaluators (fidelity_every) and the sample grid (sample_every) run out of memory: each is skipped with
    a warning and the run ends as usual, its LoRA and summary written. In training (step 1): step 1's metrics line is
    written without them, step 2 has both (the evaluators' error once escaped, losing the trained step). Before
    training: the grid has nothing to compare with, so none is rendered (summary.json's samples_skipped says why);
    after training: no before/after figures (the before/after grid's once ended the run with its trained steps in the
    checkpoint but no LoRA)."""
    import json
    import logging

    from lowmem_alignprop.cli import main
    from lowmem_alignprop.training import train

    calls = {"judge": 0, "samples": 0}

    def out_of_memory_at(name, real):
        def fn(self):
            calls[name] += 1
            if calls[name] in (fail[name] if isinstance(fail[name], tuple) else (fail[name],)):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
            return real(self)
        return fn

    monkeypatch.setattr(train.Trainer, "judge", out_of_memory_at("judge", train.Trainer.judge))
    monkeypatch.setattr(train.Trainer, "render_samples", out_of_memory_at("samples", train.Trainer.render_samples))
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert main(["--model", "toy", "--profile", "cpu", "--output-dir", str(out), "--steps", "2", "--set",
                     "sample_steps=2", "--set", "fidelity_images=2", "--set", "fidelity_every=1", "--set",
                     "sample_prompts=1", "--set", "sample_every=1"]) == 0
    rows = strict_rows(out)
    summary = json.loads((out / "summary.json").read_text())
    assert [r["step"] for r in rows] == [1, 2] and (out / "lora").is_dir() and summary["steps_done"] == 2
    said = {name: f"out of memory while {what}: skipped (a smaller --set {field} needs less)"
            for name, what, field in [("judge", {1: "judging the images before training",
                                                 2: "judging the images of step 1",
                                                 4: "judging the images after training"}[fail["judge"]],
                                       "fidelity_images"),
                                      ("samples", {1: "rendering the sample images before training",
                                                   2: "rendering the samples of step 1",
                                                   (3, 4): "rendering the sample images after training"}[
                                           fail["samples"]],
                                       "sample_prompts")]}
    assert said["judge"] in caplog.text and said["samples"] in caplog.text
    assert all("fidelity_score" in r for r in rows if r["step"] + 1 != fail["judge"])
    assert "fidelity_score" not in rows[0] if fail["judge"] == 2 else True
    assert ("toy_world" in summary) == (fail["judge"] == 2)  # before -> after: both judged, or neither reported
    grids = sorted(p.name for p in (out / "samples").glob("*.png")) if (out / "samples").is_dir() else []
    if fail["samples"] == 1:  # nothing to compare with: no grid, no sample rewards, and summary.json says why
        assert grids == [] and not any("sample_reward_mean" in r for r in rows)
        assert summary["samples_skipped"] == "out of memory while the before samples were rendered"
    elif fail["samples"] == (3, 4):  # step 2's render skipped, then the after render
        assert "out of memory while rendering the samples of step 2" in caplog.text
        assert grids == ["step-000001.png"] and "sample_reward_mean" in rows[0] and "sample_reward_mean" not in rows[1]
        assert summary["samples_skipped"] == "out of memory while they were rendered"
    else:
        assert grids == ["before_after.png", "step-000002.png"] and "samples_skipped" not in summary
        assert "sample_reward_mean" not in rows[0] and "sample_reward_mean" in rows[1]


@pytest.mark.xdist_group("short_toy_run")  # the module fixture: made once
def test_a_toy_run_reports_the_exact_evaluators_before_and_after(short_toy_run):
    import json

    import yaml

    summary = json.loads((short_toy_run / "summary.json").read_text())
    toy = summary["toy_world"]
    assert (toy["images"], toy["prompts"], toy["held_out"]) == (4, 4, 4)  # toy-pairs: every prompt held out
    for when in ("before", "after"):
        assert toy[when]["fidelity_images"] == 4 and 0 <= toy[when]["fidelity_all_ok"] <= 1
        assert toy[when]["jpeg_bytes"] > 0 and math.isfinite(toy[when]["reward"])
        assert math.isfinite(toy[when]["reward_median"])  # beside the mean: toy_clip is bimodal
        assert_rel_close(torch.tensor(toy[when]["image_rewards"]).mean(), torch.tensor(toy[when]["reward"]), REORDERED,
                         "each image's reward")
        scores = torch.tensor(toy[when]["image_scores"])  # every prompt parses: each image has its exact score
        assert_rel_close(scores.mean(), torch.tensor(toy[when]["fidelity_score"]), REORDERED, "each image's score")
    rows = strict_rows(short_toy_run)
    assert all(r["fidelity_images"] == 4 and {"fidelity_reward", "fidelity_reward_median", "jpeg_bytes"} <= set(r)
               and "image_rewards" not in r for r in rows)  # each image's figures: in summary.json only
    # the same images after the last step, judged on the same weights (the EMA's: ema_outputs)
    assert (rows[-1]["fidelity_score"], rows[-1]["fidelity_reward"]) == \
        (toy["after"]["fidelity_score"], toy["after"]["reward"])
    from lowmem_alignprop.training.run_summary import fidelity_peak
    assert toy.get("peak") == fidelity_peak(rows, toy["after"])  # a judged step better than the end: said
    # the held-out evaluation's reward keeps its own key beside the judged images' (it was overwritten by theirs)
    best = json.loads((short_toy_run / "best" / "best.json").read_text())
    assert best["eval_reward"] == next(r for r in rows if r["step"] == best["step"])["eval_reward"]
    # best_by=fidelity: best/ is the step of the highest exact held-out score (the first of equals)
    scores = [r["eval_fidelity_score"] for r in rows]
    assert best["step"] == rows[scores.index(max(scores))]["step"] and best["eval_fidelity_score"] == max(scores)
    summary = json.loads((short_toy_run / "summary.json").read_text())
    assert (summary["best_step"], summary["best_measure"]) == (best["step"], max(scores))
    config = yaml.safe_load((short_toy_run / "config.yaml").read_text())
    assert (config["model"], config["reward"], config["prompts"], config["resolution"]) == \
        ("toy", "toy_clip", "toy-pairs", 64)
    from lowmem_alignprop.training.run_summary import toy_world_lines
    lines = toy_world_lines(toy)
    assert lines[0].startswith(" toy world, 4 fixed-seed images of 4 prompts (all held out") and len(lines) == 3
    assert f"(median {toy['before']['reward_median']:.4f} -> {toy['after']['reward_median']:.4f})" in lines[0]
    # the mean count of objects the evaluator reads (what toy_count=N moves) beside the JPEG size
    assert lines[2].endswith(f"objects per image {toy['before']['fidelity_objects']:.2f} -> "
                             f"{toy['after']['fidelity_objects']:.2f}"), lines[2]


@pytest.mark.xdist_group("short_toy_run")  # the module fixture: made once
def test_the_judged_images_do_not_depend_on_the_batch_size(short_toy_run, tmp_path):
    """Every judged image has its own seed (its index), so a run with another batch size is judged on the same images:
    the "before" figures of a batch-1 run are short_toy_run's (batch 4) up to float reordering in the batched UNet,
    VAE and reward (REORDERED; with a seed per chunk of batch_size, as before, three of the four images differed)."""
    import json

    from lowmem_alignprop.cli import main

    out = tmp_path / "batch1"
    assert main(["--model", "toy", "--profile", "cpu", "--output-dir", str(out), "--steps", "1", "--set",
                 "sample_steps=4", "--set", "fidelity_images=4", "--set", "batch_size=1", "--set",
                 "sample_prompts=0"]) == 0
    one = json.loads((out / "summary.json").read_text())["toy_world"]["before"]
    four = json.loads((short_toy_run / "summary.json").read_text())["toy_world"]["before"]
    assert_rel_close(torch.tensor(one["reward"]), torch.tensor(four["reward"]), REORDERED, "judged reward")
    assert one["fidelity_images"] == four["fidelity_images"] == 4


@pytest.mark.xdist_group("short_toy_run")  # the module fixture: made once
def test_the_summarys_first_and_last_reward_compare_the_same_prompts(short_toy_run):
    """Each metrics row records every image's reward and prompt; the summary's first -> last reward is each prompt's
    mean in the first and in the last steps, over the prompts in both (a prompt that scores 10 and is drawn only at
    the start no longer makes a rising run look like a falling one)."""
    import json

    from lowmem_alignprop.training.run_summary import window_note
    from lowmem_alignprop.run.runfolder import first_last_rewards

    def row(ids, rewards):
        return {"prompt_ids": ids, "rewards": rewards, "reward_mean": sum(rewards) / len(rewards)}

    # prompt 0 rises 0 -> 1; prompt 1 (reward 10) is drawn only in the first steps
    history = [row([0], [0.0]), row([1], [10.0]), row([0], [0.0])] + [row([0], [1.0])] * 3
    got = first_last_rewards(history)
    assert (got["reward_first"], got["reward_last"], got["reward_prompts"], got["reward_window"]) == (0.0, 1.0, 1, 3)
    old = first_last_rewards([{"reward_mean": h["reward_mean"]} for h in history])  # rows of older runs
    assert old["reward_first"] == pytest.approx(10 / 3) and old["reward_last"] == 1.0 and old["reward_prompts"] is None
    assert window_note(old) == "  [first and last 3 steps, different prompts: noisy]"
    # no prompt in both windows of 3: they widen to half the run (4 steps), where prompt 1 is in both
    history = [row([0], [0.0])] * 3 + [row([1], [2.0]), row([2], [5.0])] + [row([1], [4.0])] * 3
    got = first_last_rewards(history)
    assert (got["reward_first"], got["reward_last"], got["reward_prompts"], got["reward_window"]) == (2.0, 4.0, 1, 4)
    assert window_note(got) == "  [the same 1 prompt, first and last 4 steps]"
    # a real run's rows: 4 images a step (toy defaults), each with its prompt's index in the run's 4 prompts
    rows = strict_rows(short_toy_run)
    assert all(len(r["rewards"]) == len(r["prompt_ids"]) == 4 and set(r["prompt_ids"]) <= set(range(4)) for r in rows)
    assert_rel_close(torch.tensor(rows[0]["rewards"]).mean(), torch.tensor(rows[0]["reward_mean"]), REORDERED, "mean")
    summary = json.loads((short_toy_run / "summary.json").read_text())
    assert summary["reward_window"] == 1 and summary["reward_prompts"] >= 1
    assert summary == {**summary, **first_last_rewards(rows)}


def test_a_one_step_runs_summary_shows_its_reward_without_a_change(tmp_path, capsys):
    """One step is both the first and the last: the box showed '83.09 -> 83.09 (+0.0000)', a change of nothing; and
    its figure is the step's mean reward, as its step line says (it was the mean of its prompts' means: 84.5 here)."""
    from lowmem_alignprop.training.run_summary import print_summary
    from lowmem_alignprop.run.runfolder import first_last_rewards
    from lowmem_alignprop.settings.config import Config

    one = first_last_rewards([{"prompt_ids": [0, 0, 1], "rewards": [80.0, 80.0, 89.0], "reward_mean": 83.0}])
    assert one["reward_steps"] == 1 and one["reward_first"] == one["reward_last"] == 83.0
    s = {**one, "device": "cpu", "seconds_per_step": 2.0, "peak_memory_gb": 0.05, "attention": "sdpa",
         "output_dir": str(tmp_path), "steps_done": 1}
    print_summary(s, Config(steps=1, reward="toy_clip"), "cpu")
    out = capsys.readouterr().out
    assert " reward (toy_clip): 83.0000 in the only step (nothing to compare it with)\n" in out
    assert " AlignProp finished: 1 step on cpu (profile cpu, model" in out  # not '1 steps'
    two = first_last_rewards([{"prompt_ids": [0], "rewards": [1.0], "reward_mean": 1.0}] * 2)
    print_summary({**s, **two, "steps_done": 2}, Config(steps=2, reward="toy_clip"), "cpu")
    out = capsys.readouterr().out
    assert " reward (toy_clip): 1.0000 -> 1.0000  (+0.0000)  [the same 1 prompt, first and last 1 step]\n" in out
    assert " AlignProp finished: 2 steps on cpu (profile" in out
    # under a launcher: batch_size is per process, so the box says what one optimizer step averaged (it did not)
    print_summary({**s, **two, "steps_done": 2, "processes": 2},
                  Config(steps=2, reward="toy_clip", batch_size=3, grad_accum=2), "cpu")
    assert " AlignProp finished: 2 steps on cpu x 2 processes, 12 images a step (profile cpu, model" \
        in capsys.readouterr().out


@pytest.mark.xdist_group("short_toy_run")  # the module fixture: made once
def test_sample_judges_a_toy_lora_with_the_exact_evaluators(short_toy_run, tmp_path, capsys):
    import json

    from lowmem_alignprop.cli import main

    out = tmp_path / "sample"
    assert main(["sample", "--model", "toy", "--profile", "cpu", "--lora", str(short_toy_run / "lora"),
                 "--num-prompts", "2", "--output-dir", str(out), "--set", "sample_steps=4"]) == 0
    results = json.loads((out / "sample_results.json").read_text())
    assert set(results["fidelity"]) == {"base", "lora"}
    assert results["fidelity"]["base"]["fidelity_images"] == results["fidelity"]["lora"]["fidelity_images"] == 2
    assert "exact fidelity (toy world)" in capsys.readouterr().out


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The README's first command on the toy world (its defaults: toy_clip on the four held-out pairs, 4 images a
    step, 20 steps), seed 0, without the sample grid."""
    import json

    from lowmem_alignprop.cli import main

    out = tmp_path_factory.mktemp("toy") / "default"
    assert main(["--model", "toy", "--profile", "cpu", "--output-dir", str(out), "--set", "sample_prompts=0"]) == 0
    return json.loads((out / "summary.json").read_text())["toy_world"]


def test_a_short_fixed_seed_run_raises_toy_clip_and_exact_held_out_fidelity_by_a_clear_margin(default_run):
    """The README's first command (seed 0): judged on the same 32 fixed-seed images (8 of each held-out pair) before and
    after, toy_clip's mean and the exact evaluators' fidelity score both rise by a clear margin. Measured with the
    shipped toy_clip (train_version 2: one adversarial round with the blank margin) at seeds 0-4: toy_clip +5.4,
    +14.2, +6.0, +8.3, -8.4 and the fidelity score +0.062, +0.037, +0.013, +0.100, +0.031 (docs/toy_world.md, "A blank
    margin"; with train_version 1's toy_clip both rose at 1 seed of 5). Held at seed 0 (+5.4, +0.062; all right 44% ->
    53%): toy_clip +2.5 and the score +0.03 (about half of seed 0's rises; a judged image's score moves in steps of 0.2,
    so +0.03 is at least five of the 160 checks), the all-right rate up."""
    before, after = default_run["before"], default_run["after"]
    assert default_run["held_out"] == default_run["prompts"] == 4 and default_run["images"] == 32
    assert after["reward"] >= before["reward"] + 2.5, (before["reward"], after["reward"])
    assert after["fidelity_score"] >= before["fidelity_score"] + 0.03, (before, after)
    assert after["fidelity_all_ok"] > before["fidelity_all_ok"], (before, after)


@pytest.fixture(scope="module")
def count_run(tmp_path_factory):
    """toy_count=3 with the toy model's other defaults (the four one-object held-out pairs, 4 images a step, 20
    steps), seed 0, without the sample grid."""
    import json

    from lowmem_alignprop.cli import main

    out = tmp_path_factory.mktemp("toy") / "count"
    assert main(["--model", "toy", "--profile", "cpu", "--output-dir", str(out), "--reward", "toy_count=3", "--set",
                 "sample_prompts=0"]) == 0
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow  # 45 s of CPU; the default run keeps toy_clip's run (the same training path) and the counter's test
def test_toy_count_moves_the_exact_object_count_toward_its_target(count_run):
    """Asked for 3 objects where the prompts ask for one, 20 steps move the mean number of objects the exact evaluator
    reads in the 32 fixed-seed images toward 3: seed 0 measured 0.94 -> 1.81 (each judged image its own seed; seeds
    1 and 2 so judged, 2026-12-02: 0.91 -> 1.28 and 1.00 -> 1.22); held at +0.2, under the smallest. The prompt
    fidelity falls meanwhile (0.675 -> 0.400 at seed 0): the count is what was asked, against the prompts. (Slow: the
    same training path as toy_clip's run in the default suite, and toy_count's own rule, the highest reward at N
    objects, is test_toy_rewards_are_registered_and_know_the_world's; run with -m slow.)"""
    toy = count_run["toy_world"]
    before, after = toy["before"], toy["after"]
    assert after["fidelity_objects"] >= before["fidelity_objects"] + 0.2, (before, after)
    assert abs(after["fidelity_objects"] - 3) < abs(before["fidelity_objects"] - 3)
    assert after["reward"] > before["reward"] and count_run["reward_prompts"] == 4  # the same four prompts
    assert count_run["reward_last"] > count_run["reward_first"]



def test_an_adversarial_round_fine_tunes_toy_clip_on_what_alignprop_runs_draw(tmp_path, one_thread):
    """--rewards-only --adversarial RUN: samples the run's prompts with its LoRA (and without), labels them with the
    exact evaluator and fine-tunes toy_clip alone on them; seeded, and the report names the runs' LoRA checksums."""
    import json

    from lowmem_alignprop.cli import main as cli_main
    from lowmem_alignprop.commands.train_toy_world import Schedule, main, train_world

    tiny = Schedule(**{**TINY_SCHEDULE, "gen_samples": 0, "adv_samples": 4})
    quiet = dict(seed=1, threads=1, evaluate_samples=False, log=lambda _: None)
    first = train_world(tmp_path / "first", schedule=tiny, **quiet)
    run = tmp_path / "run"
    assert cli_main(["--model", str(tmp_path / "first" / "model"), "--profile", "cpu", "--output-dir", str(run),
                     "--steps", "1", "--reward", "toy_clip", "--prompts", "toy-pairs", "--set", "resolution=64",
                     "--set", "sample_steps=2", "--set", "sample_prompts=0", "--set", "fidelity_images=0"]) == 0
    lines = []
    adv = [train_world(tmp_path / name, schedule=tiny, rewards_from=tmp_path / "first", adversarial=[run],
                       **{**quiet, "log": lines.append}) for name in ("a", "b")]
    assert adv[0]["sha256"] == adv[1]["sha256"]  # seeded
    clip, count = "rewards/toy_clip/model.safetensors", "rewards/toy_count/model.safetensors"
    assert adv[0]["sha256"][clip] != first["sha256"][clip] and adv[0]["sha256"][count] == first["sha256"][count]
    pool = adv[0]["adversarial_pool"]
    assert set(pool) == {"base", "run"} and all(p["images"] == 4 for p in pool.values())
    assert adv[0]["adversarial_runs"]["run"]["lora_sha256"]
    assert any(line.startswith("adversarial_clip 2/2 loss") for line in lines)
    assert adv[0]["schedule"]["adv_margin_weight"] == 1.0 and adv[0]["schedule"]["adv_anchor_weight"] == 10.0
    # without the blank margin and the anchor (blank_margin_terms; on by default): the plain round, another toy_clip
    plain = train_world(tmp_path / "c", schedule=Schedule(**{**TINY_SCHEDULE, "gen_samples": 0, "adv_samples": 4,
                                                             "adv_margin_weight": 0.0, "adv_anchor_weight": 0.0}),
                        rewards_from=tmp_path / "first", adversarial=[run], **quiet)
    assert plain["sha256"][clip] not in (adv[0]["sha256"][clip], first["sha256"][clip])
    assert plain["sha256"][count] == first["sha256"][count]
    saved = json.loads((tmp_path / "a" / "report.json").read_text())
    assert saved["adversarial_pool"] == pool and saved["phases_1_4_from"]["sha256"] == first["sha256"]
    with pytest.raises(SystemExit) as exit_info:  # --adversarial needs --rewards-only
        main(["--out", str(tmp_path / "x"), "--adversarial", str(run)])
    assert exit_info.value.code == 2
    assert not (tmp_path / "x").exists()


def test_the_blank_margin_puts_no_object_images_under_every_right_image():
    """blank_margin_terms, on a batch of 6 rendered scenes and 2 generated images the evaluator read no object in
    (drawn for "a blue diamond"): the margin is the mean hinge of each blank's cosine with each right caption over
    that caption's right image's cosine less the margin, plus each blank's hinge against its prompt (under the mean
    right cosine); 0 with no gradient when every blank is that far under; the anchor is 0 against the model itself
    and grows when the model moves from it."""
    import copy

    from lowmem_alignprop.commands.train_toy_world import Generated, Schedule, blank_margin_terms, tokenize
    from lowmem_alignprop.rewards.toy import ToyClipModel
    from lowmem_alignprop.toy.tokenizer import BOS, EOS, build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = ToyClipModel(len(tok), tok.get_vocab()[BOS], tok.get_vocab()[EOS], max_length=tok.model_max_length)
    reference = copy.deepcopy(model).requires_grad_(False)
    scenes = sample_scenes(6, seed=5)
    blank = Generated(make_content([]), "a blue diamond")
    batch = list(scenes) + [blank, blank]
    images = torch.cat([render_batch(scenes), torch.full((2, 3, 64, 64), 0.5)])
    texts = [caption(s) for s in scenes] + ["", ""]
    img = model.embed_images(images)
    pos = model.embed_text(tokenize(tok, texts))
    sched = Schedule(adv_margin=0.3, adv_margin_weight=2.0, adv_anchor_weight=0.0)
    got = blank_margin_terms(model, reference, img, pos, images, batch, texts, tok, sched)
    right = (img[:6] * pos[:6]).sum(-1)
    prompt = model.embed_text(tokenize(tok, ["a blue diamond"]))[0]
    expected = 2.0 * (torch.relu(img[6:] @ pos[:6].T - right[None] + 0.3).mean()
                      + torch.relu(img[6:] @ prompt - right.mean() + 0.3).mean())
    assert expected > 0
    assert_rel_close(got, expected, SAME_OPS, "margin term")
    # far enough under (a margin of -2: every cosine difference is above -2): no loss, no gradient
    far = blank_margin_terms(model, reference, img, pos, images, batch, texts, tok, Schedule(adv_margin=-2.0,
                             adv_margin_weight=2.0, adv_anchor_weight=0.0))
    assert far.item() == 0 and not torch.autograd.grad(far, img, allow_unused=True, materialize_grads=True)[0].any()
    anchor = Schedule(adv_margin_weight=0.0, adv_anchor_weight=10.0)
    assert blank_margin_terms(model, reference, img, pos, images, batch, texts, tok, anchor).item() < 1e-10
    with torch.no_grad():
        model.image.head.weight.mul_(1.5).add_(0.05)
    img = model.embed_images(images)
    moved = blank_margin_terms(model, reference, img, pos, images, batch, texts, tok, anchor)
    ref = reference.embed_images(images[:6]) @ reference.embed_text(tokenize(tok, texts[:6])).T
    assert_rel_close(moved, 10.0 * ((img[:6] @ pos[:6].T - ref) ** 2).mean(), SAME_OPS, "anchor term")
    assert moved > 0


def test_the_shipped_toy_weights_load_whole_and_match_their_report():
    """The shipped text encoder is in the hub's layout (``text_model.``): transformers 5.0 reads it, and so does
    5.24, which saves without the prefix; a file in 5.24's layout loads in 5.0 as missing weights, drawn at random
    without an error (the toy world's figures then fall to chance). Every file still has the report's checksum."""
    import hashlib
    import json

    from safetensors import safe_open
    from transformers import CLIPTextModel

    from lowmem_alignprop.models.loading import TOY_MODEL_DIR
    from lowmem_alignprop.rewards.toy import SHIPPED_REWARDS, load_toy_clip

    with safe_open(str(TOY_MODEL_DIR / "text_encoder" / "model.safetensors"), "pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())
    with safe_open(str(SHIPPED_REWARDS / "toy_clip" / "model.safetensors"), "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"image", "text", "text_proj", "logit_scale"} \
            and all(k.startswith("text.text_model.") for k in f.keys() if k.startswith("text."))
    _, info = CLIPTextModel.from_pretrained(TOY_MODEL_DIR / "text_encoder", output_loading_info=True)
    assert not any(info.values()), info
    load_toy_clip(SHIPPED_REWARDS / "toy_clip")  # strict: every weight found
    root = TOY_MODEL_DIR.parent
    report = json.loads((root / "report.json").read_text())
    assert {n: hashlib.sha256((root / n).read_bytes()).hexdigest() for n in report["sha256"]} == report["sha256"]


def test_a_toy_clip_saved_in_either_layout_loads_the_same(tmp_path):
    from safetensors.torch import load_file, save_file

    from lowmem_alignprop.rewards.toy import ToyClipModel, load_model, save_model, text_tower_names

    torch.manual_seed(0)
    model = ToyClipModel(40, 38, 39, max_length=8)
    save_model(model, tmp_path / "nested", "toy_clip", dtype=torch.float32)
    state = load_file(str(tmp_path / "nested" / "model.safetensors"))
    assert any(k.startswith("text.text_model.") for k in state)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "config.json").write_text((tmp_path / "nested" / "config.json").read_text())
    save_file(text_tower_names(state, "text.", nested=False), str(tmp_path / "flat" / "model.safetensors"))
    ids = torch.randint(0, 38, (2, 8))
    want = model.eval().embed_text(ids)
    for layout in ("nested", "flat"):
        assert torch.equal(load_model(tmp_path / layout).embed_text(ids), want), layout


def test_a_toy_reward_saved_over_its_older_self_keeps_it_whole_when_the_write_fails(tmp_path, monkeypatch):
    """train-toy-world --rewards-only reads out/rewards/toy_clip and writes the fine-tuned one back there: written in
    place, a full disk (or a kill) mid-write left a torn model.safetensors and no older one. Now the older model
    stays whole until the new one is."""
    from lowmem_alignprop.rewards.toy import ToyClipModel, load_model, save_model
    from lowmem_alignprop.run import atomic

    torch.manual_seed(0)
    old, new = ToyClipModel(40, 38, 39, max_length=8), ToyClipModel(40, 38, 39, max_length=8)
    where = tmp_path / "rewards" / "toy_clip"
    save_model(old, where, "toy_clip", dtype=torch.float32)
    before = {p.name: p.read_bytes() for p in where.iterdir()}
    monkeypatch.setenv(atomic.INJECT_ENV, "toy_clip:enospc")
    with pytest.raises(OSError):
        save_model(new, where, "toy_clip", dtype=torch.float32)
    assert {p.name: p.read_bytes() for p in where.iterdir()} == before
    assert sorted(p.name for p in where.parent.iterdir()) == ["toy_clip"]  # (no temporary folder left)
    ids = torch.randint(0, 38, (2, 8))
    assert torch.equal(load_model(where).embed_text(ids), old.eval().embed_text(ids))


def test_reward_checkpointing_lowers_what_toy_clip_and_toy_count_keep_for_backward():
    """--set reward_checkpointing=true was accepted for the toy rewards and changed nothing (their tower was never
    checkpointed): now each convolution block keeps only its input for backward, and the image gradient is the
    same up to float reordering."""
    from lowmem_alignprop.rewards import build_reward

    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a blue square and a green triangle"]
    for name in ("toy_clip", "toy_count=2"):
        kept, grads = {}, {}
        for on in (False, True):
            reward = build_reward(name, checkpointing=on)
            saved = []
            x = images.clone().requires_grad_(True)
            with torch.autograd.graph.saved_tensors_hooks(
                    lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
                r = reward(x, prompts)
            r.sum().backward()
            kept[on], grads[on] = sum(saved), x.grad
        assert kept[True] < 0.5 * kept[False], (name, kept)
        assert_rel_close(grads[True], grads[False], SAME_OPS, f"{name}'s image gradient")


def test_prompts_outside_the_toy_grammar_on_the_toy_model_are_said():
    """`--prompts animals.txt` on the toy model trained on noise-for-words without a word; every shipped toy set
    parses, other models are not the toy world's business."""
    from lowmem_alignprop.step.prompts import load_prompts
    from lowmem_alignprop.toy.fidelity import off_grammar_note

    for name in ("toy-train", "toy-heldout", "toy-pairs"):
        assert off_grammar_note("toy", load_prompts(name)) is None, name
    animals = load_prompts("simple_animals")
    said = off_grammar_note("toy", ["a red circle", *animals, animals[0]])
    assert said.startswith(f"{len(animals)} of the {len(animals) + 1} prompts are outside the toy world's grammar "
                           f"(e.g. {animals[0]!r}): the toy model knows only"), said
    assert off_grammar_note("tiny", animals) is None


def test_held_out_prompts_outside_the_toy_grammar_are_said_too(tmp_path, caplog, fresh_log_handlers, monkeypatch):
    """A held-out file with a line the grammar does not read (docs/toy_world.md's example wrote a literal '...') was
    taken in silence: its images mean nothing, and the exact evaluators judge none of them. (Said before the trainer
    starts: the trainer is left out here.)"""
    import lowmem_alignprop.training.train as train_mod
    from lowmem_alignprop.cli import main

    monkeypatch.setattr(train_mod, "Trainer", lambda *a, **k: type("Ran", (), {"run": lambda self: {}})())
    held = tmp_path / "heldout.txt"
    held.write_text("a red triangle and a blue square on a white background\n...\n")
    with caplog.at_level(logging.WARNING, logger="lowmem_alignprop"):
        assert main(["--model", "toy", "--steps", "1", "--eval-every", "1", "--set", f"eval_prompts={held}",
                     "--set", "sample_steps=4", "--set", "fidelity_images=0", "--set", "sample_prompts=0",
                     "--output-dir", str(tmp_path / "run")]) == 0
    said = [r.getMessage() for r in caplog.records if "outside the toy world's grammar" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("1 of the 2 held-out prompts are outside the toy world's grammar "
                                                 "(e.g. '...')"), said


def test_the_shipped_toy_rewards_read_the_pixels_as_they_were_trained_on():
    """The shipped counter and toy_clip on rendered scenes, read the way they were trained (pixels mapped to
    [-1, 1]): the counter names every one of 128 scenes' object count (1-4) and its expected count is within 0.45 of
    it (measured: 100%, 0.42); toy_clip scores an image's own caption 85 on average (measured 85.3). Fed [0, 1]
    pixels they still rank, but miscount one scene in ten and score own captions 75."""
    from lowmem_alignprop.rewards import build_reward

    count = build_reward("toy_count=2").model
    clip = build_reward("toy_clip")
    with torch.no_grad():
        for n in range(1, 5):
            images = render_batch(sample_scenes(32, seed=40 + n, n_objects=n, split="all"))
            assert (count(images).argmax(-1) == n).all(), n
            assert (count.expected_count(images) - n).abs().max().item() < 0.45, n
        scenes = sample_scenes(64, seed=31, split="all")
        own = clip(render_batch(scenes), [caption(s) for s in scenes])
    assert own.mean().item() > 82, own.mean().item()


def test_a_scaled_schedule_keeps_the_phases_that_are_off_off():
    """--scale multiplies every step count; a count of 0 (gen_samples=0: phases 5-6 off, the default) stays 0 (a
    scaled smoke run trained and shipped the 'robust' rewards the docs say are off); a count above 0 stays at least 1."""
    from lowmem_alignprop.commands.train_toy_world import Schedule

    small = Schedule().scaled(0.002)
    assert small.gen_samples == 0 and small.vae_steps == 3 and small.unet_steps == 12  # 1,500 and 6,000 scaled
    assert Schedule(gen_samples=1000).scaled(0.002).gen_samples == Schedule().reward_batch  # on: at least a batch
