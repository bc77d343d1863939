"""Training augmentation geometry: image and mask move together; padding is the ignore label.

The image encodes where each of its pixels came from: red = 4 x column, green = 4 x row
(linear ramps, which bilinear resizing keeps exact up to rounding) and blue = 255 on every
real pixel (padding is 0). The mask holds an asymmetric pattern of 8 x 8 blocks, so a
flip, crop or scale applied to one of them and not the other shows as wrong labels.
"""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.augment import collate, train_transform

IGNORE = 255
H, W, BLOCK = 48, 64, 8


def block_label(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Class of source pixel (y, x): not symmetric under a horizontal flip."""
    return (x // BLOCK + 2 * (y // BLOCK)) % 3


def coordinate_image() -> tuple[np.ndarray, np.ndarray]:
    """(image (H, W, 3) uint8 encoding each pixel's coordinates, mask (H, W) uint8 block labels)."""
    y, x = np.mgrid[0:H, 0:W]
    image = np.stack([4 * x, 4 * y, np.full_like(x, 255)], axis=-1).astype(np.uint8)
    return image, block_label(y, x).astype(np.uint8)


def labels_near(ys: np.ndarray, xs: np.ndarray, tol: float) -> np.ndarray:
    """(n, 4) labels of the source pixels within ``tol`` of each decoded position."""
    out = []
    for dy in (-tol, tol):
        for dx in (-tol, tol):
            yy = np.clip(np.round(ys + dy), 0, H - 1).astype(int)
            xx = np.clip(np.round(xs + dx), 0, W - 1).astype(int)
            out.append(block_label(yy, xx))
    return np.stack(out, axis=1)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("seed", range(40))
def test_scale_crop_flip_keep_image_and_mask_aligned_and_pad_the_mask_with_ignore(seed):
    image, mask = coordinate_image()
    # Crops larger than the downscaled image force padding; upscaled ones crop.
    transform = train_transform((40, 56), (0.5, 1.75), 0.0, IGNORE, seed=seed)
    out = transform(image=image, mask=mask)
    img, msk = out["image"].astype(np.float64), out["mask"]
    assert img.shape[:2] == msk.shape == (40, 56)

    padded = img[..., 2] == 0
    # Padding, and only padding, is the ignore label (and the image's 0 fill).
    np.testing.assert_array_equal(msk == IGNORE, padded)
    assert np.all(img[padded] == 0)
    assert set(np.unique(msk[~padded])) <= {0, 1, 2}

    xs, ys = img[..., 0][~padded] / 4, img[..., 1][~padded] / 4
    # Each labelled pixel carries the label of where its image pixel came from, to within
    # half a source pixel (bilinear image, nearest-neighbour mask, uint8 rounding). OpenCV's
    # legacy INTER_NEAREST samples the mask up to a whole source pixel off the image.
    near = labels_near(ys, xs, tol=0.5)
    labels = msk[~padded].astype(int)
    wrong = ~np.any(near == labels[:, None], axis=1)
    assert wrong.mean() == 0, f"{wrong.sum()} of {wrong.size} labelled pixels do not match their image pixel"


def test_the_draws_cover_flips_padding_and_both_scale_directions():
    """The geometry test above sees every case: flipped and not, padded and not."""
    image, mask = coordinate_image()
    flipped, padded, upscaled = set(), set(), set()
    for seed in range(40):
        out = train_transform((40, 56), (0.5, 1.75), 0.0, IGNORE, seed=seed)(image=image, mask=mask)
        img = out["image"].astype(np.float64)
        real = img[..., 2] > 0
        row = img[real.any(axis=1).argmax()]
        xs = row[row[:, 2] > 0, 0]
        flipped.add(bool(xs[0] > xs[-1]))
        padded.add(bool((~real).any()))
        # Adjacent columns less than one source pixel apart: the image was enlarged.
        upscaled.add(bool(np.abs(np.diff(xs)).max() < 4 * 0.9))
    assert flipped == {True, False} and padded == {True, False} and upscaled == {True, False}


def test_collate_pads_a_batch_of_unequal_sizes_with_ignore_in_the_mask():
    small, large = coordinate_image(), (np.full((60, 70, 3), 200, np.uint8), np.ones((60, 70), np.uint8))
    encoded = [(png(img), png(msk)) for img, msk in (small, large)]
    x, y = collate([e[0] for e in encoded], [e[1] for e in encoded], mean=[0, 0, 0], std=[1, 1, 1],
                   ignore_index=IGNORE)
    assert tuple(x.shape) == (2, 3, 60, 70) and tuple(y.shape) == (2, 60, 70)
    np.testing.assert_array_equal(y[0, :H, :W].numpy(), small[1])
    assert (y[0, H:, :] == IGNORE).all() and (y[0, :, W:] == IGNORE).all()
    assert (x[0, :, H:, :] == 0).all() and (x[0, :, :, W:] == 0).all()
    np.testing.assert_allclose(x[0, 0, :H, :W].numpy() * 255, small[0][..., 0], atol=1e-3)


BACKGROUND_COLLATE = """
import io, os, sys, threading
import numpy as np
import torch
from PIL import Image
sys.path.insert(0, sys.argv[1])
from pipeline.data.augment import collate

def png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()

torch.set_num_threads(2)
rng = np.random.default_rng(0)
rows = [(png(rng.integers(0, 256, (128, 160, 3), np.uint8)), png(np.ones((128, 160), np.uint8)))
        for _ in range(4)]
args = ([r[0] for r in rows], [r[1] for r in rows])
norm = {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2], "ignore_index": 255}
torch.ones(1 << 20).mul_(2.0)   # the training thread's own OpenMP pool, as in a worker
collate(*args, **norm)          # and anything collate starts once per process
started = []

def background():
    before = len(os.listdir("/proc/self/task"))
    collate(*args, **norm)
    started.append(len(os.listdir("/proc/self/task")) - before)

thread = threading.Thread(target=background)
thread.start()
thread.join()
print(started[0])
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_collate_in_a_background_thread_starts_no_torch_thread_pool():
    """Ray Data runs collate in its own thread while the step trains: a torch op there
    starts a second OpenMP pool, and libgomp, counting more pool threads than CPUs, makes
    every barrier of the training step sleep instead of spin (see ``collate``). Run in a
    fresh process so no other test's threads come or go meanwhile."""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", BACKGROUND_COLLATE, str(root)], capture_output=True,
                         text=True, cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "0", "collate started threads in its calling thread"


def test_collate_normalises_with_mean_and_std_and_pads_with_the_normalised_zero():
    image = np.full((4, 6, 3), (51, 102, 255), np.uint8)
    big = (np.zeros((5, 6, 3), np.uint8), np.zeros((5, 6), np.uint8))
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    x, _ = collate([png(image), png(big[0])], [png(np.zeros((4, 6), np.uint8)), png(big[1])],
                   mean=mean, std=std, ignore_index=IGNORE)
    assert x.dtype == torch.float32 and x.is_contiguous() and tuple(x.shape) == (2, 3, 5, 6)
    want = (np.array([51, 102, 255]) / 255 - mean) / std
    padding = -np.array(mean) / std
    np.testing.assert_allclose(x[0, :, :4].numpy(), np.broadcast_to(want[:, None, None], (3, 4, 6)),
                               rtol=1e-6)
    np.testing.assert_allclose(x[0, :, 4].numpy(), np.broadcast_to(padding[:, None], (3, 6)), rtol=1e-6)
