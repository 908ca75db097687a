"""Weight-free rewards, spec parsing, user rewards."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lowmem_alignprop.settings.errors import UserError
from lowmem_alignprop.rewards import REWARDS, RewardModule, build_reward


# --- user rewards referenced by spec strings (tests.test_rewards:...) -------------------------------
def red_reward(images, prompts):
    return images[:, 0].mean(dim=(1, 2))


def reward_factory(checkpointing=False):
    return red_reward


class GreenReward(RewardModule):
    def score(self, images, prompts):
        return images[:, 1].mean(dim=(1, 2))


def wrong_shape_reward(images, prompts):
    return images.mean()


not_callable = 3


# --- helpers ----------------------------------------------------------------------------------------
def rank(a):
    a = np.asarray(a, dtype=np.float64)
    order = np.argsort(a, kind="stable")
    r = np.empty(len(a))
    r[order] = np.arange(len(a))
    for value in np.unique(a):  # average ranks of ties
        tie = a == value
        r[tie] = r[tie].mean()
    return r


def spearman(a, b):
    return float(np.corrcoef(rank(a), rank(b))[0, 1])


def varied_images(seed=0):
    """36 uint8 HxWx3 images: gradients, flat, noise at 4 levels, stripes, checkerboards, blobs; 64-256 px."""
    rng = np.random.default_rng(seed)
    out = []

    def add(a):
        out.append(np.clip(a, 0, 255).astype(np.uint8))

    for s in (64, 128, 256):
        y, x = np.mgrid[0:s, 0:s] / s
        add(np.stack([x * 255, y * 255, (1 - x) * 128 + 64], -1))
        add(np.full((s, s, 3), 128.0))
        for level in (4, 16, 48, 128):
            add(128 + rng.normal(0, level, (s, s, 3)))
        for period in (2, 8, 32):
            stripes = ((np.arange(s) // period) % 2) * 255.0
            add(np.broadcast_to(stripes[None, :, None], (s, s, 3)))
        for period in (4, 16):
            c = ((np.arange(s)[:, None] // period + np.arange(s)[None] // period) % 2) * 200.0 + 20
            add(np.stack([c, c[::-1], c * 0 + 90], -1))
        img = np.full((s, s, 3), 40.0)
        yy, xx = np.mgrid[0:s, 0:s]
        for _ in range(6):
            cy, cx = rng.uniform(0, s, 2)
            r = rng.uniform(s / 10, s / 3)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
        add(img)
    return out


def to_tensor(a):
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].float() / 255


# --- tests ------------------------------------------------------------------------------------------
def test_registry_builds_each_named_reward(monkeypatch):
    """Each registered name builds its own reward: the weight-free and toy ones their module (named so), the model
    rewards their own builder (a name wired to another's builder trained the wrong reward with no error)."""
    from lowmem_alignprop.rewards import _builtin, clip_rewards

    assert set(REWARDS) >= {"brightness", "colorfulness", "jpeg_compressibility", "aesthetic", "clip", "pickscore",
                            "hpsv2", "toy_clip", "toy_count"} and all(REWARDS.values())
    for name in ("brightness", "colorfulness", "jpeg_compressibility", "toy_clip", "toy_count"):
        assert _builtin(name, checkpointing=False, weights="").name.startswith(name), name
    called = []
    for builder in ("build_aesthetic", "build_clip", "build_pickscore", "build_hpsv2"):
        monkeypatch.setattr(clip_rewards, builder, lambda b=builder, **kw: called.append(b))
    for name in ("aesthetic", "clip", "pickscore", "hpsv2"):
        _builtin(name, checkpointing=False, weights="")
    assert called == ["build_aesthetic", "build_clip", "build_pickscore", "build_hpsv2"]


@pytest.mark.parametrize("name", ["brightness", "colorfulness", "colourfulness", "jpeg_compressibility"])
def test_weight_free_contract(name):
    reward = build_reward(name)
    assert isinstance(reward, RewardModule) and reward.name
    assert not reward.training
    reward.train()
    assert not reward.training  # frozen rewards stay in eval mode
    assert all(not p.requires_grad for p in reward.parameters())
    torch.manual_seed(0)
    images = torch.rand(3, 3, 37, 50, requires_grad=True)
    scores = reward(images, ["a", "b", "c"])
    assert scores.shape == (3,) and scores.dtype == torch.float32
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["brightness", "colorfulness", "jpeg_compressibility"])
def test_gradient_finite_on_flat_images(name):
    reward = build_reward(name)
    images = torch.full((2, 3, 16, 16), 0.5, requires_grad=True)
    reward(images, ["", ""]).sum().backward()
    assert torch.isfinite(images.grad).all()


def test_brightness():
    reward = build_reward("brightness")
    white, black = torch.ones(1, 3, 8, 8), torch.zeros(1, 3, 8, 8)
    assert reward(white, [""]).item() == pytest.approx(1.0)
    assert reward(black, [""]).item() == pytest.approx(0.0)


def test_colourfulness():
    reward = build_reward("colourfulness")
    assert reward.name == "colorfulness"
    grey = torch.full((1, 3, 16, 16), 0.5)
    saturated = torch.zeros(1, 3, 16, 16)
    saturated[:, 0, :, :8] = 1
    saturated[:, 2, :, 8:] = 1
    assert reward(grey, [""]).item() < 0.01
    assert reward(saturated, [""]).item() > 100


def test_jpeg_surrogate_tracks_pillow():
    reward = build_reward("jpeg_compressibility")
    images = varied_images()
    sizes, by_size = [], {}
    for a in images:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=95)
        sizes.append(buf.tell())
        by_size.setdefault(a.shape, []).append(len(sizes) - 1)
    estimates = [0.0] * len(sizes)
    with torch.no_grad():
        for idx in by_size.values():  # one batch per image size
            batch = torch.cat([to_tensor(images[i]) for i in idx])
            for i, score in zip(idx, reward(batch, [""] * len(idx)).tolist()):
                estimates[i] = -score
    rho = spearman(estimates, sizes)
    assert len(sizes) >= 30
    assert rho >= 0.9, rho  # measured: 0.988
    ratio = np.array(estimates) * 1024 / np.array(sizes)  # reward is minus kilobytes
    assert 0.3 < ratio.min() and ratio.max() < 3


def test_jpeg_gradient_prefers_smooth():
    reward = build_reward("jpeg_compressibility")
    torch.manual_seed(0)
    noisy = (0.5 + 0.2 * torch.randn(1, 3, 32, 32)).clamp(0, 1)
    assert reward(torch.full((1, 3, 32, 32), 0.5), [""]) > reward(noisy, [""])
    x = noisy.clone().requires_grad_(True)
    reward(x, [""]).sum().backward()
    # one small step along the gradient makes the file smaller
    assert reward((noisy + 0.01 * x.grad / x.grad.abs().max()).clamp(0, 1), [""]) > reward(noisy, [""])


def test_combined_spec_is_weighted_sum():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 24, 24)
    prompts = ["a", "b"]
    combined = build_reward("brightness:1.0,colorfulness:0.5, jpeg_compressibility:-2")
    expected = (build_reward("brightness")(images, prompts) + 0.5 * build_reward("colorfulness")(images, prompts)
                - 2 * build_reward("jpeg_compressibility")(images, prompts))
    torch.testing.assert_close(combined(images, prompts), expected)
    single = build_reward("brightness:2")
    torch.testing.assert_close(single(images, prompts), 2 * build_reward("brightness")(images, prompts))


def test_module_and_device_dtype():
    reward = build_reward("brightness:1,colourfulness:0.1", device="cpu", dtype=torch.float16)
    assert isinstance(reward, torch.nn.Module)
    out = reward(torch.rand(2, 3, 8, 8, dtype=torch.float16), ["", ""])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_custom_function():
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    reward = build_reward("tests.test_rewards:red_reward")
    assert isinstance(reward, RewardModule)
    out = reward(images, ["", ""])
    torch.testing.assert_close(out, images[:, 0].mean(dim=(1, 2)))
    out.sum().backward()
    assert images.grad.abs().sum() > 0


def test_custom_factory_class_and_weights():
    images = torch.rand(2, 3, 8, 8)
    red, green = images[:, 0].mean(dim=(1, 2)), images[:, 1].mean(dim=(1, 2))
    torch.testing.assert_close(build_reward("tests.test_rewards:reward_factory()")(images, ["", ""]), red)
    torch.testing.assert_close(build_reward("tests.test_rewards:GreenReward")(images, ["", ""]), green)
    mixed = build_reward("tests.test_rewards:red_reward:0.5,brightness:1,tests.test_rewards:GreenReward")
    torch.testing.assert_close(mixed(images, ["", ""]),
                               0.5 * red + build_reward("brightness")(images, ["", ""]) + green)


@pytest.mark.parametrize("spec, needle", [
    ("no_such_reward", "unknown reward"),
    ("brightnes:1.0", "unknown reward"),
    ("no_such_pkg.module:fn", "cannot import"),
    ("tests.test_rewards:missing_fn", "has no"),
    ("tests.test_rewards:not_callable", "not callable"),
    ("", "empty"),
    ("brightness,,colorfulness", "empty term"),
])
def test_bad_specs(spec, needle):
    with pytest.raises(UserError, match=needle) as err:
        build_reward(spec)
    message = str(err.value)
    assert "\n" not in message
    if needle in ("unknown reward", "cannot import", "has no"):
        assert "brightness" in message and "jpeg_compressibility" in message


def test_wrong_shape_from_user_function():
    reward = build_reward("tests.test_rewards:wrong_shape_reward")
    with pytest.raises(UserError, match="shape"):
        reward(torch.rand(2, 3, 8, 8), ["", ""])


def test_input_checks():
    reward = build_reward("brightness")
    with pytest.raises(ValueError):
        reward(torch.rand(2, 8, 8), ["", ""])
    with pytest.raises(ValueError):
        reward(torch.rand(2, 3, 8, 8), [""])


def test_a_zero_weight_term_is_pointed_out(caplog):
    from lowmem_alignprop.rewards import check_reward_spec

    with caplog.at_level("WARNING"):
        check_reward_spec("brightness:1,colorfulness:0")
    assert "reward term 'colorfulness' has weight 0" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        check_reward_spec("brightness:1,colorfulness:0.5")
    assert "weight 0" not in caplog.text


def test_a_reward_weights_entry_no_reward_uses_is_pointed_out(caplog):
    import logging

    from lowmem_alignprop.rewards import _split_weights

    # one path for two model rewards: the example names the spec's (it always said aesthetic and clip); a key twice
    # (the last was taken); a value in the quotes a shell takes off (it was read as one path, and said to be)
    with pytest.raises(UserError, match=r"give one per reward: --set reward_weights='clip=PATH;pickscore=PATH'$"):
        _split_weights("/w/clip", ["clip", "pickscore"])
    with pytest.raises(UserError, match=r"^reward_weights gives clip twice \(/a and /b\): keep one$"):
        _split_weights("clip=/a;clip=/b", ["clip"])
    with pytest.raises(UserError, match=r"in quotes that a shell would have removed .*: write it without them: "
                                        r"aesthetic=/a;clip=/b$"):
        _split_weights("'aesthetic=/a;clip=/b'", ["aesthetic", "clip"])

    with caplog.at_level(logging.WARNING):
        assert _split_weights("aesthetic=/a;clip=/b", ["clip"])["clip"] == "/b"
    assert "reward_weights gives aesthetic=/a for aesthetic, which --reward does not use" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _split_weights("aesthetic=/a;clip=/b", ["clip", "aesthetic"])
    assert caplog.text == ""
    # one path for a reward that reads no weights was taken in silence (the keyed form above is said once)
    from lowmem_alignprop.rewards import build_reward
    with caplog.at_level(logging.WARNING):
        build_reward("brightness", weights="/nonexistent/x")
        build_reward("brightness", weights="aesthetic=/a")
    said = [r.getMessage() for r in caplog.records]
    assert said[0].startswith("reward_weights=/nonexistent/x: --reward brightness reads no weights (only aesthetic, ")
    assert said[0].endswith(" and your own rewards do): it is not used") and len(said) == 2, said


def test_brightness_weighs_the_channels_as_bt601_luma():
    """Pure red, green and blue score their BT.601 weights (0.299, 0.587, 0.114): a swap of two weights scores
    another image brighter, and white still scores 1."""
    reward = build_reward("brightness")
    primaries = torch.zeros(3, 3, 4, 4)
    for c in range(3):
        primaries[c, c] = 1
    torch.testing.assert_close(reward(primaries, ["", "", ""]), torch.tensor([0.299, 0.587, 0.114]))


def test_colourfulness_is_hasler_suesstrunks_formula():
    """Half red, half blue: sigma_rgyb + 0.3 * mu_rgyb on the 0..255 scale, worked by hand (rg = 255 | 0,
    yb = 127.5 | -255: sqrt(255^2/4 + 382.5^2/4) + 0.3 * sqrt(127.5^2 + 63.75^2) = 272.6187)."""
    image = torch.zeros(1, 3, 16, 16)
    image[:, 0, :, :8] = 1
    image[:, 2, :, 8:] = 1
    assert build_reward("colorfulness")(image, [""]).item() == pytest.approx(272.6187, rel=1e-5)


@pytest.mark.parametrize("quality", [30, 50, 75, 95])
def test_jpeg_quantisation_tables_are_the_ones_pillow_writes(quality):
    """The quality-scaled tables are libjpeg's: the ones Pillow writes into a file at that quality."""
    from lowmem_alignprop.rewards.simple import _JPEG_CHROMA_Q, _JPEG_LUMA_Q, jpeg_quant_table

    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, format="JPEG", quality=quality)
    tables = Image.open(buf).quantization
    assert jpeg_quant_table(_JPEG_LUMA_Q, quality).flatten().tolist() == list(tables[0])
    assert jpeg_quant_table(_JPEG_CHROMA_Q, quality).flatten().tolist() == list(tables[1])


def test_the_jpeg_dct_is_the_orthonormal_8x8_dct_jpeg_codes():
    """dct_matrix is JPEG's 8x8 DCT-II (T.81 A.3.3: C(0) = 1/sqrt(2)): orthonormal, and a flat block of ones has the
    DC coefficient 8 (1/4 * C(0)^2 * 64) and no AC. Without C(0) every DC coefficient came out twice JPEG's (and
    the first row's and column's AC sqrt(2) times), and test_jpeg_surrogate_tracks_pillow's ranking still held."""
    from lowmem_alignprop.rewards.simple import dct_matrix

    d = dct_matrix(8)
    eps = torch.finfo(torch.float32).eps * 8  # a dot product of 8 float32 terms
    torch.testing.assert_close(d @ d.T, torch.eye(8), rtol=0, atol=eps)
    flat = d @ torch.ones(8, 8) @ d.T
    assert flat[0, 0].item() == pytest.approx(8.0, rel=64 * eps)
    assert flat.flatten()[1:].abs().max().item() <= 64 * eps
