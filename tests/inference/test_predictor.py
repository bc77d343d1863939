"""Whole-image prediction (pipeline.inference.predictor): tiles blend to the whole-image answer, and a
tiled prediction holds a band of probabilities, not the whole image's."""

import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.inference.predictor import Predictor
from pipeline.inference.tensors import to_tensor
from pipeline.models.base import ModelMeta, SegmentationModel
from tests.factories import whole_image_accumulation

ROOT = Path(__file__).resolve().parents[2]


class PixelNet(nn.Module):
    """A 1x1 convolution: each pixel's logits depend on that pixel alone (no receptive
    field), so a tile sees exactly what the whole image sees."""

    def __init__(self, classes: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.head = nn.Conv2d(3, classes, 1)
        self.encoder = SimpleNamespace(output_stride=1)     # SegmentationModel's size rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x) * 4.0                            # sharper softmax: fewer near-ties


def pixel_model(classes: int = 5, seed: int = 0) -> SegmentationModel:
    meta = ModelMeta(tuple(f"c{i}" for i in range(classes)), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    return SegmentationModel(PixelNet(classes, seed), meta).eval()


def picture(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("h,w", [(70, 90), (90, 70), (64, 64), (33, 200)])
@pytest.mark.parametrize("flip", [False, True])
def test_tiles_equal_the_whole_image_for_a_per_pixel_model(h, w, flip):
    model = pixel_model()
    image = picture(h, w, seed=h * w)
    whole = Predictor(model, flip_tta=flip)
    tiled = Predictor(model, flip_tta=flip, tile_above_pixels=1024, tile_size=(32, 48), tile_overlap=0.25)
    torch.testing.assert_close(tiled.probs(image), whole.probs(image), atol=1e-6, rtol=1e-5)
    np.testing.assert_array_equal(tiled.mask(image), whole.mask(image))
    np.testing.assert_array_equal(tiled.masks([image, image[:40]])[0], whole.mask(image))


def test_tiles_equal_the_whole_image_with_multiscale_for_a_per_pixel_model():
    # Scales apply to each window; the per-pixel model gives a resized window's pixels what the
    # resized whole image's pixels get except within one pixel of the window edges (bilinear).
    model = pixel_model()
    image = np.repeat(np.repeat(picture(18, 24, seed=3), 4, axis=0), 4, axis=1)   # 72x96, 4x4 blocks
    for scales in [(1.0,), (0.5, 1.0), (1.0, 2.0)]:
        whole = Predictor(model, scales=scales).mask(image)
        tiled = Predictor(model, scales=scales, tile_above_pixels=1024, tile_size=(32, 48)).mask(image)
        assert (whole != tiled).mean() < 0.02, scales


@pytest.mark.parametrize("h,w", [(97, 131), (131, 97)])
def test_band_sweep_blends_like_the_whole_image_accumulation(fitted, h, w):
    model, _ = fitted                            # a real Unet: tiles see different context
    image = picture(h, w, seed=1)
    predictor = Predictor(model, tile_above_pixels=1024, tile_size=(32, 48), tile_overlap=0.25)
    reference = whole_image_accumulation(model, image, (32, 48), 0.25)
    torch.testing.assert_close(predictor.probs(image), reference, atol=1e-6, rtol=1e-5)
    np.testing.assert_array_equal(predictor.mask(image), reference.argmax(0).to(torch.uint8).numpy())


def test_untiled_images_are_predicted_as_before(fitted):
    model, _ = fitted
    image = picture(70, 90, seed=2)
    x = to_tensor([image], model.meta.mean, model.meta.std)
    with torch.no_grad():
        plain = model(x)[0].softmax(0)
    torch.testing.assert_close(Predictor(model).probs(image), plain, atol=0, rtol=0)


RSS_SCRIPT = textwrap.dedent("""
    import resource, sys
    import numpy as np, torch
    sys.path.insert(0, {root!r})
    from tests.inference.test_predictor import pixel_model, picture
    from pipeline.inference.predictor import Predictor
    torch.set_num_threads(1)
    h, w, classes = {h}, {w}, {classes}
    model = pixel_model(classes)
    predictor = Predictor(model, tile_above_pixels=65536, tile_size=(256, 256), tile_overlap=0.25)
    image = picture(h, w)
    predictor.mask(picture(300, 300))                    # warm up torch's allocator and threads
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mask = predictor.mask(image)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert mask.shape == (h, w) and mask.dtype == np.uint8
    print((after - before) / 1024)
""")


def test_tiled_prediction_holds_a_band_not_the_whole_image():
    """Peak RSS added by one tiled 1500x1500 prediction at 16 classes, in a fresh process.

    The whole image's float32 probabilities are 16 x 1500 x 1500 x 4 B = 144 MB (and the
    old code held two or three such tensors at once); a 256-row band is 25 MB."""
    h = w = 1500
    classes = 16
    script = RSS_SCRIPT.format(root=str(ROOT), h=h, w=w, classes=classes)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    added_mb = float(out.stdout.strip().splitlines()[-1])
    whole_mb = classes * h * w * 4 / 2**20
    band_mb = classes * 256 * w * 4 / 2**20
    assert added_mb < 3 * band_mb + 40, f"{added_mb:.0f} MB added; whole-image probs: {whole_mb:.0f} MB"


# ---- refinement with the image (postprocess) --------------------------------------------------

CRF = {"iterations": 5, "gaussian_sxy": 3, "gaussian_compat": 3, "bilateral_sxy": 80, "bilateral_srgb": 13,
       "bilateral_compat": 10}


def test_a_refined_mask_is_the_refinement_of_the_whole_images_probabilities():
    from pipeline.inference.refine import dense_crf, grabcut
    from pipeline.models.base import Refinement

    image = picture(40, 56, seed=3)
    crf = Predictor(pixel_model(3), postprocess=Refinement("crf", CRF))
    expected = dense_crf(image, Predictor(pixel_model(3)).probs(image).numpy(), **CRF).argmax(0)
    np.testing.assert_array_equal(crf.mask(image), expected)
    np.testing.assert_array_equal(crf.masks([image, image[:20]])[0], expected)     # batches: each alone
    cut = {"iterations": 3, "sure": 0.9, "margin": None}
    two = Predictor(pixel_model(2, seed=1), postprocess={"method": "grabcut", "params": cut})  # JSON's form
    p = Predictor(pixel_model(2, seed=1)).probs(image).numpy()
    np.testing.assert_array_equal(two.mask(image), grabcut(image, p[1], **cut).astype(np.uint8))
    assert two.settings().postprocess == Refinement("grabcut", cut)


def test_refinements_the_model_cannot_take_are_refused_with_what_to_do():
    from pipeline.inference.refine import RefineError
    from pipeline.models.base import Refinement

    with pytest.raises(ValueError, match=r"grabcut refines a binary mask \(2 classes\); this model has 3"):
        Predictor(pixel_model(3), postprocess=Refinement("grabcut", {"iterations": 1, "sure": 0.9}))
    assert Predictor(pixel_model(3), postprocess=Refinement("none")).postprocess is None
    tiled = Predictor(pixel_model(3), postprocess=Refinement("crf", CRF), tile_above_pixels=1024)
    with pytest.raises(RefineError, match=r"refines images of at most tile_above_pixels \(1,024\) pixels"):
        tiled.mask(picture(40, 56))
    with pytest.raises(ValueError, match="postprocess: 'blur' is not one of none, crf, grabcut"):
        Refinement("blur")
