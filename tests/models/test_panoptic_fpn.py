"""Panoptic FPN (family torchvision, arch panoptic_fpn_mobilenet_v2): what it trains on, what it
answers, what it refuses, where its weights come from."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.artifacts.model_dir import CONFIG_FILE, load_model, save_model
from pipeline.config import paths
from pipeline.config.model_params import PANOPTIC_ARCH, ModelParams
from pipeline.config.params import PANOPTIC_LOSS_NAMES, LossParams
from pipeline.models.base import ModelMeta
from pipeline.models.panoptic_fpn import SEMANTIC_LOSS, THING, PanopticModel
from pipeline.models.registry import build_model, ensure_weights
from pipeline.models.weights import WeightsUnavailableError
from pipeline.tasks.instance import INSTANCE_LOSS_TERMS, PANOPTIC_LOSS_TERMS, InstanceTask, PanopticFPNLoss

MOBILENET_FILE = "mobilenet_v2-b0353104.pth"
SHARED_WEIGHTS = Path(os.environ.get(paths.ENV_WEIGHTS_DIR, "/nonexistent"))

CLASSES = 5
THINGS = (1, 3)             # classes 0, 2 and 4 are stuff: semantic channels 0, 1, 2; 'thing' is 3
STUFF = (0, 2, 4)
IGNORE = 255
H, W = 97, 131              # odd sides: padded to 32s inside, answered at these
MASKRCNN_LOSSES = set(INSTANCE_LOSS_TERMS.values())
# Few proposals and detections at evaluation: a random network's hundreds cost seconds each.
FEW = {"rpn_post_nms_top_n_test": 100, "box_detections_per_img": 10}
BASE = dict(family="torchvision", arch=PANOPTIC_ARCH, encoder_weights=None, in_channels=3, classes=None,
            image_scale=1.0, trainable_layers=3, kwargs={})


def cfg(**kw):
    return ModelParams.model_validate(BASE | kw)


def build(things=THINGS, **kw) -> PanopticModel:
    torch.manual_seed(0)
    return build_model(cfg(**kw), CLASSES, ModelMeta(thing_classes=things, ignore_index=IGNORE))


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt fails the test: the family never downloads."""
    def refuse(*args, **kwargs):
        raise AssertionError("Panoptic FPN tried to reach the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)


def target(segments: list[tuple[int, slice, slice]], h: int = H, w: int = W) -> dict:
    """A target of rectangular segments (class, rows, cols) over stuff class 0, a void band at
    the bottom: boxes, labels, masks of every segment given (stuff too, as the data gives
    them) and the semantic map."""
    semantic = torch.zeros((h, w), dtype=torch.int64)
    semantic[-5:] = IGNORE
    masks = torch.zeros((len(segments), h, w), dtype=torch.uint8)
    boxes = []
    for k, (cls, rows, cols) in enumerate(segments):
        semantic[rows, cols] = cls
        masks[k, rows, cols] = 1
        boxes.append([cols.start, rows.start, cols.stop, rows.stop])
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([s[0] for s in segments], dtype=torch.int64),
            "masks": masks, "semantic": semantic}


TWO_THINGS_AND_STUFF = [(1, slice(10, 40), slice(20, 60)), (3, slice(50, 80), slice(70, 120)),
                        (2, slice(0, 8), slice(0, W))]


def test_detections_start_at_the_fusions_min_score_unless_kwargs_say_otherwise():
    """The fusion pastes no instance scoring below its min score, so the model computes no
    mask for one (one source of truth: pipeline.inference.panoptic_fusion)."""
    from pipeline.inference.panoptic_fusion import DEFAULT_MIN_SCORE

    assert build().net.roi_heads.score_thresh == DEFAULT_MIN_SCORE
    assert build(kwargs={"box_score_thresh": 0.2}).net.roi_heads.score_thresh == 0.2


@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_trains_at_odd_sizes_and_any_image_scale(scale):
    model = build(image_scale=scale).train()
    x = torch.randn(2, 3, H, W)
    losses = model(x, [target(TWO_THINGS_AND_STUFF), target([])])     # the second image has no things
    assert set(losses) == MASKRCNN_LOSSES | {SEMANTIC_LOSS}
    assert all(torch.isfinite(v) for v in losses.values())
    PanopticFPNLoss()(losses).backward()
    for name, p in (("semantic branch", model.semantic_head.predictor.weight),
                    ("mask head", model.net.roi_heads.mask_predictor.mask_fcn_logits.weight),
                    ("RPN", model.net.rpn.head.conv[0][0].weight),
                    ("backbone", next(p for p in model.net.backbone.body.parameters() if p.requires_grad))):
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_an_image_without_things_trains():
    model = build().train()
    losses = model(torch.randn(1, 3, 64, 80), [target([(2, slice(0, 20), slice(0, 80))], 64, 80)])
    assert losses["loss_mask"].detach().item() == 0 and losses["loss_box_reg"].detach().item() == 0
    assert losses[SEMANTIC_LOSS].detach().item() > 0
    PanopticFPNLoss()(losses).backward()
    assert model.semantic_head.predictor.weight.grad.abs().sum() > 0


def test_stuff_segments_are_left_out_of_mask_rcnn_and_things_become_contiguous_labels():
    model = build()
    mapped = model._torchvision_target(target(TWO_THINGS_AND_STUFF))
    assert mapped["labels"].tolist() == [1, 2]                 # class 1 -> thing 1, class 3 -> thing 2
    assert len(mapped["boxes"]) == len(mapped["masks"]) == 2
    semantic = mapped["semantic"]
    assert int(semantic[20, 30]) == len(STUFF)                 # a thing pixel: the 'thing' channel
    assert int(semantic[2, 2]) == STUFF.index(2) and int(semantic[30, 5]) == STUFF.index(0)
    assert int(semantic[-1, 0]) == -100                        # void: cross-entropy's ignore_index


@pytest.mark.parametrize("scale", [2.0, 1.5, 0.5])
def test_the_semantic_target_is_resized_with_the_image(scale):
    model = build(image_scale=scale).train()
    mapped = model._torchvision_target(target(TWO_THINGS_AND_STUFF))
    batch, (resized,) = model.net.transform([torch.randn(3, H, W)], [mapped])
    size = batch.image_sizes[0]
    assert tuple(resized["semantic"].shape) == tuple(size) == tuple(resized["masks"].shape[-2:])
    assert size == (math.floor(H * scale), math.floor(W * scale))
    expected = F.interpolate(mapped["semantic"][None, None].float(), size=size, mode="nearest")[0, 0].long()
    assert resized["semantic"].dtype == torch.int64 and torch.equal(resized["semantic"], expected)


def test_the_semantic_loss_is_cross_entropy_over_labelled_pixels():
    """With every logit 0 each labelled pixel costs log(S + 1), whatever the scale; void costs nothing."""
    model = build(image_scale=1.5).train()
    predictor = model.semantic_head.predictor
    with torch.no_grad():
        predictor.weight.zero_()
        predictor.bias.zero_()
        x = torch.randn(1, 3, H, W)
        losses = model(x, [target(TWO_THINGS_AND_STUFF)])
        void = target([])
        void["semantic"][:] = IGNORE
        void_loss = model(x, [void])[SEMANTIC_LOSS]
    assert float(losses[SEMANTIC_LOSS]) == pytest.approx(math.log(len(STUFF) + 1), rel=1e-5)
    assert float(void_loss) == 0


def test_answers_in_dataset_class_indices_and_the_input_s_pixels():
    model = build(image_scale=1.5, kwargs=FEW | {"box_score_thresh": 0.0}).eval()
    with torch.no_grad():
        (out,) = model(torch.randn(1, 3, H, W))
    k = len(out["boxes"])
    assert k and out["boxes"].shape == (k, 4) and out["scores"].shape == out["labels"].shape == (k,)
    assert out["masks"].shape == (k, 1, H, W)
    assert 0 <= float(out["masks"].min()) <= float(out["masks"].max()) <= 1
    assert set(out["labels"].tolist()) <= set(THINGS)
    assert float(out["boxes"][:, 2].max()) <= W and float(out["boxes"][:, 3].max()) <= H
    assert out["semantic"].shape == (H, W) and out["semantic"].dtype == torch.int64
    assert set(out["semantic"].unique().tolist()) <= set(STUFF) | {THING}


@pytest.mark.parametrize(("channel", "expected"), [(1, STUFF[1]), (len(STUFF), THING)])
def test_the_semantic_answer_maps_channels_to_classes(channel, expected):
    model = build(kwargs={"box_score_thresh": 1.0}).eval()       # no detections: the semantic branch alone
    predictor = model.semantic_head.predictor
    with torch.no_grad():
        predictor.weight.zero_()
        predictor.bias.zero_()
        predictor.bias[channel] = 10.0
        (out,) = model(torch.randn(1, 3, H, W))
    assert torch.equal(out["semantic"], torch.full((H, W), expected))
    assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,) and out["masks"].shape == (0, 1, H, W)


def test_detected_labels_map_back_to_the_thing_classes():
    model = build(kwargs=FEW | {"box_score_thresh": 0.5}).eval()
    cls_score = model.net.roi_heads.box_predictor.cls_score
    with torch.no_grad():
        cls_score.weight.zero_()
        cls_score.bias.zero_()
        cls_score.bias[2] = 10.0                  # torchvision's label 2: the second thing class
        (out,) = model(torch.randn(1, 3, H, W))
    assert len(out["labels"]) and set(out["labels"].tolist()) == {THINGS[1]}


def test_refuses_thing_classes_it_cannot_use():
    with pytest.raises(ValueError, match="thing_classes: panoptic_fpn_mobilenet_v2 needs .* none given"):
        build(things=())
    with pytest.raises(ValueError, match="thing_classes: all 5 classes are things; .* one stuff class"):
        build(things=tuple(range(CLASSES)))
    with pytest.raises(ValueError, match=r"thing_classes: \[7\] are not class indices .* 5 classes"):
        build(things=(1, 7))
    with pytest.raises(ValueError, match="thing_classes: expected distinct 0-based class indices"):
        ModelMeta(thing_classes=(1, 1))


def test_refuses_kwargs_maskrcnn_does_not_take_or_the_family_sets():
    with pytest.raises(ValueError, match="'box_detections_per_image'.*accepted: .*box_detections_per_img"):
        build(kwargs={"box_detections_per_image": 300})
    with pytest.raises(ValueError, match="min_size set by the torchvision family"):
        build(kwargs={"min_size": 800})
    assert build(kwargs={"box_detections_per_img": 7}).net.roi_heads.detections_per_img == 7


def test_refuses_targets_it_cannot_read():
    model = build().train()
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match="needs targets"):
        model(x)
    bad = target([(1, slice(0, 10), slice(0, 10))], 64, 64)
    bad["semantic"][0, 0] = 9
    with pytest.raises(ValueError, match="semantic holds values other than class indices 0..4 and ignore"):
        model(x, [bad])
    bad = target([(6, slice(0, 10), slice(0, 10))], 64, 64)
    with pytest.raises(ValueError, match=r"labels \[6\] are not all class indices 0..4"):
        model(x, [bad])


def test_imagenet_weights_need_the_weights_folder_and_nothing_is_downloaded(monkeypatch, tmp_path):
    monkeypatch.delenv(paths.ENV_WEIGHTS_DIR, raising=False)
    with pytest.raises(WeightsUnavailableError, match=paths.ENV_WEIGHTS_DIR):
        ensure_weights(cfg(encoder_weights="imagenet"))
    with pytest.raises(WeightsUnavailableError, match=paths.ENV_WEIGHTS_DIR):
        build(encoder_weights="imagenet")
    monkeypatch.setenv(paths.ENV_WEIGHTS_DIR, str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match="not found"):
        ensure_weights(cfg(encoder_weights="imagenet"))


@pytest.mark.skipif(not (SHARED_WEIGHTS / MOBILENET_FILE).is_file(),
                    reason=f"${paths.ENV_WEIGHTS_DIR} with {MOBILENET_FILE} not available")
def test_the_backbone_loads_the_verified_imagenet_file(monkeypatch):
    monkeypatch.setenv(paths.ENV_WEIGHTS_DIR, str(SHARED_WEIGHTS))
    ensure_weights(cfg(encoder_weights="imagenet"))
    model = build(encoder_weights="imagenet")
    state = torch.load(SHARED_WEIGHTS / MOBILENET_FILE, weights_only=True)
    assert torch.equal(model.net.backbone.body["0"][0].weight, state["features.0.0.weight"])
    assert torch.equal(model.net.backbone.body["14"].conv[2].weight, state["features.14.conv.2.weight"])


def test_the_meta_and_weights_round_trip_through_the_model_dir(tmp_path):
    model = build(image_scale=1.5).eval()
    save_model(tmp_path, model, cfg(image_scale=1.5), CLASSES)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["meta"]["thing_classes"] == list(THINGS)
    loaded = load_model(tmp_path)
    assert isinstance(loaded, PanopticModel) and loaded.meta == model.meta
    assert loaded.meta.thing_classes == THINGS and loaded.net.transform.scale == 1.5
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert torch.equal(loaded.channel_ids, torch.tensor([*STUFF, THING]))


def test_an_older_meta_without_thing_classes_still_loads():
    meta = ModelMeta(class_names=("a", "b")).to_dict()
    del meta["thing_classes"]
    assert ModelMeta(**meta).thing_classes == ()
    assert ModelMeta(**ModelMeta(class_names=("a", "b"), thing_classes=[1]).to_dict()).thing_classes == (1,)


def test_parameter_count():
    model = build()
    total = sum(p.numel() for p in model.parameters())
    semantic = sum(p.numel() for p in model.semantic_head.parameters())
    print(f"Panoptic FPN MobileNetV2: {total / 1e6:.2f} M parameters, semantic branch {semantic / 1e6:.2f} M")
    assert 15e6 < total < 30e6 and 0.8e6 < semantic < 1.5e6


def test_loss_terms_and_their_paper_default_weights():
    assert tuple(PANOPTIC_LOSS_TERMS) == PANOPTIC_LOSS_NAMES
    ones = {key: torch.tensor(1.0) for key in PANOPTIC_LOSS_TERMS.values()}
    assert float(PanopticFPNLoss()(ones)) == pytest.approx(5.5)     # five instance losses at 1, semantic 0.5
    assert float(PanopticFPNLoss({"semantic": 2.0, "mask": 1.0})(ones)) == pytest.approx(3.0)
    terms = LossParams.defaults(terms=dict.fromkeys(PANOPTIC_LOSS_NAMES, 1.0))
    with pytest.raises(ValueError, match="semantic are semantic-segmentation losses; the instance task"):
        InstanceTask().build_loss(terms, 2, IGNORE, None)


def test_params_take_the_arch_with_the_mobilenet_weights():
    assert cfg(encoder_weights="imagenet", trainable_layers=6).arch == PANOPTIC_ARCH
