"""Video adapter: tubelet layout (patchify/unpatchify), encode/decode round trips, real .npy and PNG/JPEG folders,
streaming equal to whole-file reading and to one model pass, bad input errors that name file and frame, the
bidirectional classify option, checkpoints that remember the adapter, and a tiny model that learns motion."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from seqlab.checkpoint import load_model, save_model
from seqlab.config import BackboneConfig
from seqlab.domains import adapter_from_checkpoint, adapter_from_info, get_adapter
from seqlab.domains.video import VideoAdapter, VideoModel, VideoSource, moving_square_clips, natural_key
from seqlab.errors import ConfigError, CorruptFileError, InputError, StateError
from seqlab.train import TrainConfig, Trainer

TINY = BackboneConfig(d_model=16, n_layer=2, d_state=8)


def random_video(frames=6, h=8, w=12, c=3, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(frames, h, w, c), dtype=np.uint8)


def write_pngs(folder, frames, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        name = names[i] if names else f"f{i}.png"
        Image.fromarray(frame[:, :, 0] if frame.shape[2] == 1 else frame).save(folder / name)
    return folder


# ------------------------------------------------------------------------------------------------------
# layout


@settings(max_examples=40, deadline=None)
@given(
    t=st.integers(1, 3),
    ph=st.integers(1, 4),
    pw=st.integers(1, 4),
    gh=st.integers(1, 3),
    gw=st.integers(1, 3),
    slabs=st.integers(1, 4),
    c=st.sampled_from([1, 3, 4]),
    batch=st.booleans(),
)
def test_patchify_and_unpatchify_are_exact_inverses(t, ph, pw, gh, gw, slabs, c, batch):
    a = VideoAdapter(frame_size=(gh * ph, gw * pw), channels=c, tubelet=(t, ph, pw))
    shape = (slabs * t, gh * ph, gw * pw, c)
    frames = torch.randn((2, *shape) if batch else shape)
    patches = a.patchify(frames)
    assert patches.shape == ((2,) if batch else ()) + (slabs, a.width)
    assert a.width == gh * gw * t * ph * pw * c
    assert torch.equal(a.unpatchify(patches), frames)
    assert torch.equal(a.patchify(a.unpatchify(patches)), patches)


def test_token_layout_is_one_slab_per_step_tubelets_in_raster_order():
    a = VideoAdapter(frame_size=(4, 6), channels=2, tubelet=(2, 2, 3))
    frames = torch.arange(4 * 4 * 6 * 2, dtype=torch.float32).reshape(4, 4, 6, 2)
    patches = a.patchify(frames)
    assert patches.shape == (2, 4 * 2 * 2 * 3 * 2)  # 2 slabs of 2 frames; 2x2 grid of tubelets of 24 values
    for s in range(2):
        for k, (gy, gx) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):  # row of the patch grid, then column
            tubelet = frames[2 * s : 2 * s + 2, 2 * gy : 2 * gy + 2, 3 * gx : 3 * gx + 3, :]  # (t, ph, pw, C) order
            assert torch.equal(patches[s, k * 24 : (k + 1) * 24], tubelet.reshape(-1))


def test_encode_decode_round_trip_every_pixel_value():
    a = VideoAdapter(frame_size=(16, 16), channels=1, tubelet=(1, 4, 4))
    frames = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    x = a.encode(frames)
    assert x.dtype == torch.float32 and x.shape == (1, 256)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert np.array_equal(a.decode(x), frames)
    video = random_video(c=3)
    b = VideoAdapter(frame_size=(8, 12), channels=3, tubelet=(2, 4, 4))
    assert np.array_equal(b.decode(b.encode(video)), video)
    assert np.array_equal(b.decode(b.encode(torch.from_numpy(video))), video)  # torch input too
    assert np.array_equal(b.decode(b.encode(list(video))), video)  # a list of (H, W, C) frames too
    # (T, H, W) is one channel
    assert np.array_equal(a.decode(a.encode(frames[..., 0])), frames)


def test_decode_clips_and_rounds_half_to_even():
    a = VideoAdapter(frame_size=(1, 6), channels=1, tubelet=(1, 1, 1))
    pred = torch.tensor([[-0.3, 1.7, 0.5 / 255, 1.5 / 255, 2.5 / 255, 100.4 / 255]], dtype=torch.float64)
    assert a.decode(pred).reshape(-1).tolist() == [0, 255, 0, 2, 2, 100]
    # float frames in [0, 1] encode as themselves and decode to the pixels they round to
    frames = np.array([[[[0.0], [0.2], [0.999], [1.0], [0.5], [0.25]]]], dtype=np.float32)
    assert torch.allclose(a.encode(frames), torch.from_numpy(frames).reshape(1, 6))
    assert a.decode(a.encode(frames)).reshape(-1).tolist() == [0, 51, 255, 255, 128, 64]


# ------------------------------------------------------------------------------------------------------
# files


def test_npy_and_png_folder_round_trip_and_read_equally(tmp_path):
    a = VideoAdapter(frame_size=(8, 12), channels=3, tubelet=(1, 4, 4))
    video = random_video(frames=5)
    a.write(tmp_path / "clip.npy", video)
    a.write(tmp_path / "frames", video)
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [f"frame_00000{i}.png" for i in range(5)]
    with Image.open(tmp_path / "frames" / "frame_000003.png") as image:  # real PNGs other tools can open
        assert image.format == "PNG" and image.mode == "RGB" and np.array_equal(np.asarray(image), video[3])
    assert np.array_equal(a.read(tmp_path / "clip.npy"), video)
    assert np.array_equal(a.read(tmp_path / "frames"), video)
    assert a.num_frames(tmp_path / "frames") == a.num_frames(tmp_path / "clip.npy") == 5
    grey = VideoAdapter(frame_size=(8, 12), channels=1, tubelet=(1, 4, 4))
    a_grey = random_video(frames=3, c=1)
    grey.write(tmp_path / "grey", a_grey)
    with Image.open(tmp_path / "grey" / "frame_000000.png") as image:
        assert image.mode == "L"
    assert np.array_equal(grey.read(tmp_path / "grey"), a_grey)
    # no temp files are left behind by the atomic writes
    assert not [p for p in tmp_path.rglob(".*")]


def test_folder_frames_come_in_natural_order_and_other_files_are_ignored(tmp_path):
    a = VideoAdapter(frame_size=(4, 4), channels=1, tubelet=(1, 2, 2))
    names = ["img10.png", "img2.png", "img1.png", "IMG3.png"]
    frames = np.stack([np.full((4, 4, 1), v, dtype=np.uint8) for v in (10, 2, 1, 3)])
    write_pngs(tmp_path / "f", frames, names)
    (tmp_path / "f" / "notes.txt").write_text("not a frame")
    (tmp_path / "f" / ".hidden.png").write_bytes(b"junk")
    assert a.read(tmp_path / "f")[:, 0, 0, 0].tolist() == [1, 2, 3, 10]
    assert sorted(["a10", "a9", "b1", "a09x"], key=natural_key) == ["a9", "a09x", "a10", "b1"]


def test_jpeg_and_colour_conversion(tmp_path):
    ramp = np.linspace(0, 255, 16)
    video = (
        np.stack(
            [
                np.stack(
                    [ramp[None, :] + 0 * ramp[:, None], ramp[:, None] + 0 * ramp[None, :], np.full((16, 16), 40.0 * i)],
                    -1,
                )
                for i in range(3)
            ]
        )
        .round()
        .astype(np.uint8)
    )
    folder = tmp_path / "jpg"
    folder.mkdir()
    for i, frame in enumerate(video):
        Image.fromarray(frame).save(folder / f"{i}.jpg", quality=95)
    rgb = VideoAdapter(frame_size=(16, 16), channels=3).read(folder)
    assert rgb.shape == (3, 16, 16, 3) and rgb.dtype == np.uint8
    assert np.abs(rgb.astype(int) - video.astype(int)).mean() < 4  # JPEG is lossy, but these are the frames
    grey = VideoAdapter(frame_size=(16, 16), channels=1).read(folder)  # Pillow's L conversion (ITU-R 601-2)
    with Image.open(folder / "1.jpg") as image:
        assert np.array_equal(grey[1, :, :, 0], np.asarray(image.convert("L")))


@pytest.mark.parametrize("kind", ["npy", "folder"])
@pytest.mark.parametrize("window", [1, 2, 3, 7])
def test_streaming_windows_equal_whole_file(tmp_path, kind, window):
    a = VideoAdapter(frame_size=(8, 12), channels=3, tubelet=(2, 4, 4))
    video = random_video(frames=10, seed=window)
    path = tmp_path / ("v.npy" if kind == "npy" else "v")
    a.write(path, video)
    windows = list(a.iter_windows(path, window))
    assert [w.shape[0] for w in windows[:-1]] == [window] * (len(windows) - 1)
    assert torch.equal(torch.cat(windows), a.encode(a.read(path)))
    frames = list(a.iter_frames(path, window))
    assert all(f.shape[0] <= window for f in frames) and np.array_equal(np.concatenate(frames), video)


def test_npy_streams_from_a_memory_map(tmp_path):
    a = VideoAdapter(frame_size=(64, 64), channels=3)
    video = np.random.default_rng(0).integers(0, 256, size=(200, 64, 64, 3), dtype=np.uint8)  # 2.4 MB
    a.write(tmp_path / "long.npy", video)
    del video
    tracemalloc.start()
    try:
        total = 0
        for frames in a.iter_frames(tmp_path / "long.npy", 8):
            total += int(frames[:, 0, 0, 0].astype(np.int64).sum())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == int(a.read(tmp_path / "long.npy")[:, 0, 0, 0].astype(np.int64).sum())
    assert peak < 400_000, f"streaming held {peak} bytes; the file is 2.4 MB"


def test_float_npy_frames(tmp_path):
    a = VideoAdapter(frame_size=(4, 4), channels=1, tubelet=(1, 2, 2))
    video = np.random.default_rng(0).random((4, 4, 4, 1)).astype(np.float32)
    np.save(tmp_path / "f.npy", video)
    assert torch.equal(torch.cat(list(a.iter_windows(tmp_path / "f.npy", 3))), a.encode(video))
    a.write(tmp_path / "f.png.d", video)  # float frames are stored as the pixels they round to
    assert np.array_equal(a.read(tmp_path / "f.png.d"), np.round(video * 255).astype(np.uint8))


# ------------------------------------------------------------------------------------------------------
# bad input


def test_bad_settings_raise_config_errors():
    with pytest.raises(ConfigError, match="divisible"):
        VideoAdapter(frame_size=(10, 16), tubelet=(1, 4, 4))
    with pytest.raises(ConfigError, match="num_classes"):
        VideoAdapter(task="classify")
    with pytest.raises(ConfigError, match="num_classes"):
        VideoAdapter(task="next_frame", num_classes=3)
    with pytest.raises(ConfigError, match="task"):
        VideoAdapter(task="segment")
    with pytest.raises(ConfigError, match="channels"):
        VideoAdapter(channels=5)
    with pytest.raises(ConfigError, match="tubelet"):
        VideoAdapter(tubelet=(1, 0, 4))
    with pytest.raises(ConfigError, match="bidirectional"):
        VideoAdapter().build_model(BackboneConfig(d_model=16, n_layer=1, bidirectional=True))


def test_wrong_frame_shapes_and_dtypes():
    a = VideoAdapter(frame_size=(8, 12), channels=3, tubelet=(2, 4, 4))
    with pytest.raises(InputError, match=r"shape \(5, 12, 8, 3\), expected \(T, 8, 12, 3\)"):
        a.encode(np.zeros((5, 12, 8, 3), np.uint8))
    with pytest.raises(InputError, match=r"expected \(T, 8, 12, 3\)"):
        a.encode(np.zeros((4, 8, 12), np.uint8))  # no channel axis for a 3-channel adapter
    with pytest.raises(InputError, match="dtype int16"):
        a.encode(np.zeros((4, 8, 12, 3), np.int16))
    with pytest.raises(InputError, match="dtype bool"):
        a.encode(np.zeros((4, 8, 12, 3), bool))
    with pytest.raises(InputError, match="no frames"):
        a.encode(np.zeros((0, 8, 12, 3), np.uint8))
    with pytest.raises(InputError, match="5 frames, not a multiple of the tubelet's t=2"):
        a.encode(np.zeros((5, 8, 12, 3), np.uint8))
    with pytest.raises(InputError, match=r"frames\[2\] has shape \(8, 12, 1\)"):
        a.encode([np.zeros((8, 12, 3), np.uint8)] * 2 + [np.zeros((8, 12, 1), np.uint8)])
    with pytest.raises(InputError, match="numpy array"):
        a.encode({"frames": 1})
    with pytest.raises(InputError, match=r"adapter.read\(path\)"):
        a.encode("clip.npy")


def test_nan_and_out_of_range_float_frames_name_the_frame(tmp_path):
    a = VideoAdapter(frame_size=(4, 4), channels=1, tubelet=(1, 2, 2))
    video = np.full((6, 4, 4, 1), 0.5, dtype=np.float32)
    video[4, 2, 1, 0] = np.nan
    with pytest.raises(InputError, match=r"frames: frame 4 has value nan at \(row 2, column 1, channel 0\)"):
        a.encode(video)
    np.save(tmp_path / "nan.npy", video)
    windows = a.iter_windows(tmp_path / "nan.npy", 2)
    next(windows), next(windows)  # frames 0..3 are fine
    with pytest.raises(InputError, match=r"nan\.npy: frame 4 has value nan"):
        next(windows)
    video[4, 2, 1, 0] = 1.5
    with pytest.raises(InputError, match=r"frame 4 has value 1\.5 .* outside \[0, 1\]"):
        a.encode(video)
    video[4, 2, 1, 0] = np.inf
    with pytest.raises(InputError, match="frame 4 has value inf .* not finite"):
        a.encode(video)


def test_bad_files_name_file_and_frame(tmp_path):
    a = VideoAdapter(frame_size=(8, 8), channels=3, tubelet=(1, 4, 4))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: the folder holds no image frames"):
        a.read(tmp_path / "empty")
    (tmp_path / "only_text").mkdir()
    (tmp_path / "only_text" / "a.txt").write_text("x")
    with pytest.raises(InputError, match="no image frames"):
        list(a.iter_windows(tmp_path / "only_text", 2))

    frames = random_video(frames=4, h=8, w=8)
    write_pngs(tmp_path / "corrupt", frames)
    (tmp_path / "corrupt" / "f2.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(CorruptFileError, match=r"f2\.png: frame 2 cannot be read as an image"):
        a.read(tmp_path / "corrupt")
    windows = a.iter_windows(tmp_path / "corrupt", 1)
    next(windows), next(windows)
    with pytest.raises(CorruptFileError, match=r"f2\.png: frame 2"):
        next(windows)
    truncated = tmp_path / "truncated"
    write_pngs(truncated, frames)
    data = (truncated / "f1.png").read_bytes()
    (truncated / "f1.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match=r"f1\.png: frame 1 cannot be read"):
        a.read(truncated)

    mixed = write_pngs(tmp_path / "mixed", frames)
    Image.fromarray(random_video(frames=1, h=8, w=10)[0]).save(mixed / "f3.png")
    with pytest.raises(
        InputError,
        match=r"f3\.png: frame 3 is 8x10 \(HxW\), the adapter's frame_size is 8x8; the "
        r"first frame f0\.png is 8x8",
    ):
        a.read(mixed)

    deep = tmp_path / "deep"
    deep.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(deep / "0.png")  # a 16-bit PNG is not an 8-bit frame
    with pytest.raises(InputError, match=r"0\.png: frame 0 has image mode 'I;16'"):
        a.read(deep)

    (tmp_path / "zero.npy").write_bytes(b"")
    with pytest.raises(CorruptFileError, match=r"zero\.npy: the file is empty"):
        a.read(tmp_path / "zero.npy")
    (tmp_path / "junk.npy").write_bytes(b"not an npy header at all")
    with pytest.raises(CorruptFileError, match=r"junk\.npy: not a readable \.npy"):
        list(a.iter_windows(tmp_path / "junk.npy", 4))
    np.save(tmp_path / "wrong.npy", np.zeros((3, 8, 9, 3), np.uint8))
    with pytest.raises(InputError, match=r"wrong\.npy: frames have shape \(3, 8, 9, 3\)"):
        a.read(tmp_path / "wrong.npy")
    np.save(tmp_path / "ints.npy", np.zeros((3, 8, 8, 3), np.int32))
    with pytest.raises(InputError, match=r"ints\.npy: frames have dtype int32"):
        a.read(tmp_path / "ints.npy")
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        a.read(tmp_path / "missing.npy")
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 10)
    with pytest.raises(InputError, match=r"clip\.mp4: unknown video format '\.mp4'"):
        a.read(tmp_path / "clip.mp4")


def test_write_refuses_mixing_videos_and_single_images(tmp_path):
    a = VideoAdapter(frame_size=(8, 8), channels=3)
    a.write(tmp_path / "v", random_video(frames=2, h=8, w=8))
    with pytest.raises(InputError, match="already holds image files"):
        a.write(tmp_path / "v", random_video(frames=1, h=8, w=8))
    with pytest.raises(InputError, match="not as one image file"):
        a.write(tmp_path / "one.png", random_video(frames=1, h=8, w=8))
    with pytest.raises(InputError, match="shape"):
        a.write(tmp_path / "bad.npy", np.zeros((2, 4, 4, 3), np.uint8))
    assert not (tmp_path / "bad.npy").exists()


def test_model_input_errors():
    a = VideoAdapter(frame_size=(8, 8), channels=1, tubelet=(1, 4, 4))
    model = a.build_model(TINY)
    with pytest.raises(InputError, match="width=64"):
        model(torch.zeros(1, 3, 65))
    with pytest.raises(InputError, match=r"shape \(3, 8, 8, 1\)"):
        model(torch.zeros(3, 8, 8, 1))
    frames = torch.full((2, 3, 8, 8, 1), 0.5)
    frames[1, 2, 0, 5, 0] = float("nan")
    with pytest.raises(InputError, match=r"clip 1, frame 2 has value nan at \(row 0, column 5"):
        model(frames)
    with pytest.raises(InputError, match="dtype torch.int32"):
        model(torch.zeros(1, 2, 8, 8, 1, dtype=torch.int32))


# ------------------------------------------------------------------------------------------------------
# model: streaming, step, bidirectional, checkpoints


def test_model_streams_windows_with_carried_state_equal_to_one_pass(tmp_path):
    torch.manual_seed(0)
    a = VideoAdapter(frame_size=(8, 12), channels=3, tubelet=(2, 4, 4), embed_dim=8)
    model = a.build_model(TINY).eval()
    assert isinstance(model, VideoModel)
    video = random_video(frames=22, seed=3)
    a.write(tmp_path / "v", video)
    with torch.no_grad():
        whole = model(a.encode(a.read(tmp_path / "v"))[None])
        assert whole.output.shape == (1, 11, a.width) and whole.state.position == 11
        outs = list(a.stream(model, tmp_path / "v", 3))
        assert len(outs) == 4
        streamed = torch.cat([o.output for o in outs], 1)
        assert torch.allclose(streamed, whole.output, atol=1e-5), (streamed - whole.output).abs().max()
        for name, t in whole.state.tensors().items():
            assert torch.allclose(outs[-1].state.tensors()[name], t, atol=1e-5), name
        # frames in (uint8) give exactly what their patches give
        from_frames = model(torch.from_numpy(video)[None])
        assert torch.equal(from_frames.output, whole.output)
        # step: one slab at a time (patches or frames) equals forward
        state = None
        for s in range(4):
            x = a.encode(video[2 * s : 2 * s + 2])
            out = model.step(x if s % 2 else torch.from_numpy(video[None, 2 * s : 2 * s + 2]), state)
            state = out.state
            assert torch.allclose(out.output, whole.output[:, s], atol=1e-5)
    # the predicted patches decode to frames
    pred = a.decode(whole)
    assert pred.shape == (1, 22, 8, 12, 3) and pred.dtype == np.uint8


def test_bidirectional_classifier_needs_the_whole_clip():
    a = VideoAdapter(frame_size=(8, 8), channels=1, tubelet=(2, 4, 4), task="classify", num_classes=3)
    model = a.build_model(BackboneConfig(d_model=16, n_layer=1, d_state=4, bidirectional=True)).eval()
    clip = torch.rand(2, 6, 8, 8, 1)
    out = model(clip)
    assert out.output.shape == (2, 3, 3) and out.state is None
    with torch.no_grad():  # the first step's logits depend on the last slab: it reads both ways
        changed = clip.clone()
        changed[:, -2:] = torch.rand(2, 2, 8, 8, 1)
        assert not torch.allclose(model(changed).output[:, 0], out.output[:, 0])
    causal = a.build_model(BackboneConfig(d_model=16, n_layer=1, d_state=4)).eval()
    with torch.no_grad():
        assert torch.equal(causal(changed).output[:, 0], causal(clip).output[:, 0])
    with pytest.raises(StateError, match="whole clip"):
        next(a.stream(model, clip[0].numpy(), 1))
    with pytest.raises(StateError, match="cannot stream"):
        model(clip, causal.init_state(2))
    with pytest.raises(StateError, match="cannot step"):
        model.step(clip[:, :2])


def test_checkpoint_remembers_the_adapter(tmp_path):
    a = VideoAdapter(frame_size=(8, 8), channels=1, tubelet=(2, 4, 4), task="classify", num_classes=4, embed_dim=8)
    assert get_adapter("video") is VideoAdapter
    assert adapter_from_info(a.info()) == a and VideoAdapter(**a.settings()) == a
    assert a != VideoAdapter(frame_size=(8, 8), channels=1, tubelet=(2, 4, 4), task="classify", num_classes=5)
    model = a.build_model(TINY)
    save_model(tmp_path / "m.safetensors", model)
    b = adapter_from_checkpoint(tmp_path / "m.safetensors")
    assert b == a and b.tubelet == (2, 4, 4)
    restored = b.build_model(TINY)
    load_model(tmp_path / "m.safetensors", restored)
    clip = torch.rand(1, 4, 8, 8, 1)
    with torch.no_grad():
        assert torch.equal(restored(clip).output, model(clip).output)


def test_losses_metrics_and_baselines():
    c = VideoAdapter(frame_size=(4, 4), channels=1, tubelet=(1, 2, 2), task="classify", num_classes=4)
    labels = torch.tensor([0, 3, 1])
    logits = torch.zeros(3, 5, 4)
    assert c.metric(logits, labels) == pytest.approx(2.0) == c.uniform_baseline()
    assert c.loss(logits, labels).item() == pytest.approx(math.log(4))
    logits[torch.arange(3), -1, labels] = 50.0
    assert c.accuracy(logits, labels) == 1.0 and c.metric(logits, labels) < 1e-6
    with pytest.raises(InputError, match="label 7 of clip 1"):
        c.loss(logits, torch.tensor([0, 7, 1]))
    n = VideoAdapter(frame_size=(4, 4), channels=1, tubelet=(2, 2, 2))
    assert n.uniform_baseline() is None and n.metric_name == "mse" and c.metric_name == "bits_per_clip"
    frames = torch.rand(1, 6, 4, 4, 1)
    x = n.patchify(frames)
    # copy baseline: both frames of the next slab guessed as the current slab's last frame
    guess = torch.cat([frames[:, 1:2], frames[:, 1:2], frames[:, 3:4], frames[:, 3:4]], 1)
    assert n.copy_baseline(x[:, :-1], x[:, 1:]) == pytest.approx(float(((guess - frames[:, 2:]) ** 2).mean()))
    assert n.metric(x[:, 1:], x[:, 1:]) == 0.0 and n.psnr(0.01) == pytest.approx(20.0)


def test_video_source_windows():
    a = VideoAdapter(frame_size=(8, 8), channels=1, tubelet=(1, 4, 4))
    clips, labels = moving_square_clips(4, 9, size=8, square=2, seed=0)
    src = VideoSource(a, clips, batch_size=2, window=4)
    assert src.num_windows == 4
    x0, y0 = src.window(0)
    x1, _ = src.window(1)
    x2, _ = src.window(2)
    assert x0.shape == (2, 4, a.width) and torch.equal(y0[:, :-1], x0[:, 1:]) and torch.equal(y0[:, -1], x1[:, 0])
    assert torch.equal(x2, torch.stack([a.encode(c[:4]) for c in clips[2:]]))
    c = VideoAdapter(frame_size=(8, 8), channels=1, tubelet=(1, 4, 4), task="classify", num_classes=4)
    cls = VideoSource(c, clips, batch_size=2, labels=labels)
    x, y = cls.window(1)
    assert x.shape == (2, 9, a.width) and torch.equal(y, torch.as_tensor(labels[2:]))
    with pytest.raises(InputError, match="needs labels"):
        VideoSource(c, clips, batch_size=2)


# ------------------------------------------------------------------------------------------------------
# proof that it learns


def test_tiny_model_learns_motion_well_below_the_copy_previous_frame_baseline():
    """A square moves one pixel per frame in a per-clip direction. Predicting that nothing moves (copying the
    last frame) is the baseline to beat: only a model that has inferred the direction can do better."""
    torch.manual_seed(0)
    a = VideoAdapter(frame_size=(16, 16), channels=1, tubelet=(2, 4, 4), embed_dim=16)
    steps, batch = 250, 8
    clips, _ = moving_square_clips(batch * steps, 12, size=16, seed=1)
    held_out, _ = moving_square_clips(64, 12, size=16, seed=2)
    model = a.build_model(BackboneConfig(d_model=32, n_layer=2, d_state=16))
    train, test = VideoSource(a, clips, batch), VideoSource(a, held_out, 64)
    config = TrainConfig(
        lr=1e-2,
        max_steps=steps,
        warmup_steps=10,
        batch_size=batch,
        window=train.window_size,
        carry_state=False,
        weight_decay=0.0,
        progress=False,
    )
    x, y = test.window(0)
    model.eval()
    with torch.no_grad():
        before = a.metric(model(x), y)
    Trainer(model, config, train, loss_fn=a.loss, metric_fn=a.metric, loss_unit=a.loss_unit).fit()
    model.eval()
    with torch.no_grad():
        after = a.metric(model(x), y)
    copy = a.copy_baseline(x, y)
    assert after < 0.6 * copy < before, (before, after, copy)
