import math

import pytest
import torch

from pipeline.config.params import LOSS_NAMES, LossParams
from pipeline.losses.terms import (
    BoundaryCrossEntropy,
    CrossEntropy,
    boundary_mask,
    build_loss,
    resolve_class_weights,
    top_count,
)

IGN = 255
# A tiny batch written out: N=1, C=3, H=2, W=3, as LOGITS[c][row][col].
LOGITS = [
    [[2.0, -1.0, 0.5], [0.0, 1.5, -0.5]],
    [[0.5, 1.0, -1.0], [1.0, 0.0, 2.0]],
    [[-1.0, 0.0, 1.5], [0.5, -1.0, 0.0]],
]
TARGETS = {
    "all_classes": [[0, 1, 2], [IGN, 1, 0]],
    "class_2_absent": [[0, 1, 1], [IGN, 1, 0]],
}
CLASS_WEIGHTS = [1.0, 2.0, 0.5]
CFG = {"focal_gamma": 2.0, "tversky_alpha": 0.3, "tversky_beta": 0.7, "topk_fraction": 0.4,
       "boundary_width": 1, "distance_w0": 10.0, "distance_sigma": 1.5, "sensitivity_weight": 0.3,
       "hausdorff_alpha": 2.0}


def loss_params(**kw) -> LossParams:
    """The repository's loss section with plain CE and no class weights, then ``kw``."""
    return LossParams.defaults(**({"terms": {"ce": 1.0}, "class_weights": None} | kw))


def make_loss(name, ignore_index=IGN, num_classes=3, **cfg):
    weights = CLASS_WEIGHTS[:num_classes] if name == "weighted_ce" else None
    params = loss_params(terms={name: 1.0}, class_weights=weights, **{**CFG, **cfg})
    return build_loss(params, num_classes, ignore_index, class_weights=weights)


# ---- the same quantities, by hand, on lists of floats -----------------------------------

def pixels(logits, target, ignore=IGN):
    """[(logit vector over classes, label)] of the labelled pixels."""
    c = len(logits)
    return [([logits[k][i][j] for k in range(c)], y)
            for i, row in enumerate(target) for j, y in enumerate(row) if y != ignore]


def softmax(v):
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


def nll(v, y):
    return -math.log(softmax(v)[y])


def ce_hand(px):
    return sum(nll(v, y) for v, y in px) / len(px)


def weighted_ce_hand(px, w=CLASS_WEIGHTS):
    return sum(w[y] * nll(v, y) for v, y in px) / sum(w[y] for _, y in px)


def focal_hand(px, gamma=CFG["focal_gamma"]):
    # smp's multiclass focal: a one-vs-rest sigmoid focal loss per class, averaged.
    per_class = []
    for c in range(len(px[0][0])):
        terms = []
        for v, y in px:
            p = 1 / (1 + math.exp(-v[c]))
            pt = p if y == c else 1 - p
            terms.append(-((1 - pt) ** gamma) * math.log(pt))
        per_class.append(sum(terms) / len(terms))
    return sum(per_class) / len(per_class)


def overlap_hand(px, score):
    """Mean over all classes of 1 - score(I, P, T, FP, FN); a class absent from the target adds 0."""
    losses = []
    for c in range(len(px[0][0])):
        prob = [softmax(v)[c] for v, _ in px]
        true = [float(y == c) for _, y in px]
        inter = sum(p * t for p, t in zip(prob, true, strict=True))
        fp = sum(p * (1 - t) for p, t in zip(prob, true, strict=True))
        fn = sum((1 - p) * t for p, t in zip(prob, true, strict=True))
        losses.append(1 - score(inter, sum(prob), sum(true), fp, fn) if sum(true) else 0.0)
    return sum(losses) / len(losses)


def dice_hand(px):
    return overlap_hand(px, lambda i, p, t, fp, fn: 2 * i / (p + t))


def jaccard_hand(px):
    return overlap_hand(px, lambda i, p, t, fp, fn: i / (p + t - i))


def tversky_hand(px, a=CFG["tversky_alpha"], b=CFG["tversky_beta"]):
    return overlap_hand(px, lambda i, p, t, fp, fn: i / (i + a * fp + b * fn))


def lovasz_hand(px):
    # Lovasz extension of the Jaccard loss (Berman et al. 2018), classes present in the target:
    # errors sorted descending; the k-th error weighs J(first k wrong) - J(first k-1 wrong).
    losses = []
    for c in sorted({y for _, y in px}):
        errs = sorted(((abs(float(y == c) - softmax(v)[c]), y == c) for v, y in px), reverse=True)
        n_fg = sum(fg for _, fg in errs)
        loss, prev, fg_seen = 0.0, 0.0, 0
        for k, (e, fg) in enumerate(errs, start=1):
            fg_seen += fg
            jac = 1 - (n_fg - fg_seen) / (n_fg + k - fg_seen)
            loss += e * (jac - prev)
            prev = jac
        losses.append(loss)
    return sum(losses) / len(losses)


def topk_hand(px, fraction=CFG["topk_fraction"]):
    hardest = sorted((nll(v, y) for v, y in px), reverse=True)
    k = math.ceil(fraction * len(px))
    return sum(hardest[:k]) / k


def boundary_hand(px):
    # Width 1 on these 2x3 targets: every labelled pixel has a neighbour of another label.
    return ce_hand(px)


def sensitivity_specificity_hand(px, r=CFG["sensitivity_weight"]):
    per_class = []
    for c in range(len(px[0][0])):
        err = [((y == c) - softmax(v)[c]) ** 2 for v, y in px]
        pos = [e for e, (_, y) in zip(err, px, strict=True) if y == c]
        neg = [e for e, (_, y) in zip(err, px, strict=True) if y != c]
        per_class.append(r * sum(pos) / max(len(pos), 1) + (1 - r) * sum(neg) / max(len(neg), 1))
    return sum(per_class) / len(per_class)


HAND = {"ce": ce_hand, "weighted_ce": weighted_ce_hand, "focal": focal_hand, "dice": dice_hand,
        "jaccard": jaccard_hand, "lovasz": lovasz_hand, "tversky": tversky_hand, "topk": topk_hand,
        "boundary": boundary_hand, "sensitivity_specificity": sensitivity_specificity_hand}


# ---- the distance-based terms, by hand on the whole grid (brute-force Euclidean distances) ----

def cells(grid):
    return [(i, j) for i in range(len(grid)) for j in range(len(grid[0]))]


def nearest(x, points):
    return min(math.dist(x, q) for q in points) if points else math.inf


def softmax_at(logits, i, j):
    return softmax([logits[k][i][j] for k in range(len(logits))])


def distance_ce_hand(logits, target, ignore=IGN, w0=CFG["distance_w0"], sigma=CFG["distance_sigma"]):
    """U-Net's weight map: edges are labelled pixels with another value (the ignore label too)
    in their 3 x 3 window."""
    h, w = len(target), len(target[0])
    def window(i, j):
        rows, cols = range(max(0, i - 1), min(h, i + 2)), range(max(0, j - 1), min(w, j + 2))
        return {target[a][b] for a in rows for b in cols}
    labelled = [x for x in cells(target) if target[x[0]][x[1]] != ignore]
    edges = [x for x in labelled if window(*x) != {target[x[0]][x[1]]}]
    weights = {x: 1 + w0 * math.exp(-nearest(x, edges) ** 2 / (2 * sigma**2)) for x in labelled}
    return sum(weights[x] * -math.log(softmax_at(logits, *x)[target[x[0]][x[1]]]) for x in labelled) / sum(
        weights.values())


def side_distance(x, inside, grid):
    """MONAI's distance fields: to the nearest pixel on the other side (0 for an empty or full set)."""
    if not inside or len(inside) == len(cells(grid)):
        return 0.0
    return nearest(x, [q for q in cells(grid) if (q in inside) != (x in inside)])


def per_class_sets(logits, target, ignore=IGN):
    """For each class: the labelled pixels, its thresholded prediction and its label region
    (ignored pixels in neither)."""
    labelled = [x for x in cells(target) if target[x[0]][x[1]] != ignore]
    for c in range(len(logits)):
        pred = {x for x in labelled if softmax_at(logits, *x)[c] > 0.5}
        region = {x for x in labelled if target[x[0]][x[1]] == c}
        yield c, labelled, pred, region


def hausdorff_hand(logits, target, ignore=IGN, alpha=CFG["hausdorff_alpha"]):
    total, labelled = 0.0, []
    for c, labelled, pred, region in per_class_sets(logits, target, ignore):
        for x in labelled:
            err = (softmax_at(logits, *x)[c] - (x in region)) ** 2
            distances = side_distance(x, pred, target) ** alpha + side_distance(x, region, target) ** alpha
            total += err * distances
    return total / (len(labelled) * len(logits))


def surface_hand(logits, target, ignore=IGN):
    total, labelled = 0.0, []
    for c, labelled, _, region in per_class_sets(logits, target, ignore):
        for x in labelled:
            d = side_distance(x, region, target)
            phi = -(d - 1) if x in region else d
            total += (softmax_at(logits, *x)[c] - (x in region)) * phi
    return total / (len(labelled) * len(logits))


GRID_HAND = {"distance_ce": distance_ce_hand, "hausdorff": hausdorff_hand, "surface": surface_hand}


def test_every_loss_name_has_a_hand_formula():
    assert set(HAND) | set(GRID_HAND) == set(LOSS_NAMES) and not set(HAND) & set(GRID_HAND)


def hand(name, logits, target, ignore=IGN):
    if name in GRID_HAND:
        return GRID_HAND[name](logits, target, ignore)
    return HAND[name](pixels(logits, target, ignore))


@pytest.mark.parametrize("target_name", TARGETS)
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_term_matches_hand_computation(name, target_name):
    target = TARGETS[target_name]
    loss = make_loss(name)(torch.tensor([LOGITS]), torch.tensor([target]))
    assert loss.item() == pytest.approx(hand(name, LOGITS, target), abs=1e-5)


@pytest.mark.parametrize("name", ["distance_ce", "sensitivity_specificity", "hausdorff", "surface"])
def test_distance_terms_match_the_hand_computation_on_a_larger_image(name):
    """7 x 9 regions with void: distances of several pixels, edges away from the border."""
    gen = torch.Generator().manual_seed(5)
    target = torch.zeros(7, 9, dtype=torch.int64)
    target[2:6, 3:8] = 1
    target[4:, :2] = 2
    target[0, 5:] = IGN
    logits = torch.randn(3, 7, 9, generator=gen) * 2
    loss = make_loss(name)(logits[None], target[None])
    assert loss.item() == pytest.approx(hand(name, logits.tolist(), target.tolist()), rel=1e-4)


def test_the_surface_loss_is_zero_for_the_label_itself_and_grows_with_the_error():
    target = torch.zeros(1, 8, 8, dtype=torch.int64)
    target[:, 2:6, 2:6] = 1
    exact = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float() * 50
    shifted = torch.roll(exact, 1, dims=3)
    far = torch.roll(exact, 3, dims=3)
    surface = make_loss("surface", num_classes=2)
    assert surface(exact, target).item() == pytest.approx(0, abs=1e-6)
    assert 0 < surface(shifted, target).item() < surface(far, target).item()


def test_distance_ce_weighs_pixels_near_an_edge_up():
    target = torch.zeros(1, 1, 20, dtype=torch.int64)
    target[..., 10:] = 1                                     # an edge between columns 9 and 10
    logits = torch.zeros(1, 2, 1, 20)                        # the same CE everywhere
    near, far = logits.clone(), logits.clone()
    near[0, :, 0, 9] = far[0, :, 0, 0] = torch.tensor([-5.0, 5.0])   # one mistake each, class 1 for 0
    loss = make_loss("distance_ce", num_classes=2, distance_sigma=2.0)
    assert loss(near, target).item() > 2 * loss(far, target).item()
    no_edges = make_loss("distance_ce", num_classes=2)(logits, torch.zeros(1, 1, 20, dtype=torch.int64))
    assert no_edges.item() == pytest.approx(math.log(2))     # w = 1 everywhere: plain CE


def test_ce_plus_dice_is_the_weighted_sum_and_components_are_unweighted():
    logits, target = torch.tensor([LOGITS]), torch.tensor([TARGETS["all_classes"]])
    px = pixels(LOGITS, TARGETS["all_classes"])
    loss = build_loss(loss_params(terms={"ce": 0.5, "dice": 0.5}), 3, IGN)
    assert loss(logits, target).item() == pytest.approx(0.5 * ce_hand(px) + 0.5 * dice_hand(px), abs=1e-5)
    parts = loss.components(logits, target)
    assert parts == pytest.approx({"ce": ce_hand(px), "dice": dice_hand(px)}, abs=1e-5)
    assert all(isinstance(v, float) for v in parts.values())
    assert {name: w for name, (w, _) in loss.terms.items()} == {"ce": 0.5, "dice": 0.5}


def test_weighted_ce_with_weights_1_3_matches_the_formula():
    logits = torch.tensor([[[[1.0, -0.5], [0.2, 3.0]], [[0.0, 1.5], [-1.0, 0.5]]]])  # (1, 2, 2, 2)
    target = torch.tensor([[[0, 1], [1, IGN]]])
    params = loss_params(terms={"weighted_ce": 1.0}, class_weights=[1.0, 3.0])
    loss = build_loss(params, 2, IGN, class_weights=[1.0, 3.0])(logits, target)
    px = pixels(logits[0].tolist(), target[0].tolist())
    # sum_p w[y_p] * nll_p / sum_p w[y_p], over the three labelled pixels.
    expected = (1 * nll(*px[0]) + 3 * nll(*px[1]) + 3 * nll(*px[2])) / (1 + 3 + 3)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() != pytest.approx(ce_hand(px), abs=1e-3)  # the weights do change it


def test_topk_averages_exactly_the_hardest_labelled_pixels():
    # Class 1 everywhere against logit d for class 0: CE = log(1 + e^d) grows with d.
    d = [-2.0, 3.0, 0.5, 1.0, -1.0, 2.5, 0.0, -0.5, 4.0, 5.0]
    logits = torch.stack([torch.tensor(d), torch.zeros(10)]).reshape(1, 2, 2, 5).requires_grad_()
    target = torch.ones(1, 2, 5, dtype=torch.int64)
    target.view(-1)[[8, 9]] = IGN  # the two hardest pixels are ignored
    loss = make_loss("topk", num_classes=2, topk_fraction=0.25)(logits, target)  # k = ceil(0.25*8) = 2
    assert loss.item() == pytest.approx((math.log1p(math.exp(3.0)) + math.log1p(math.exp(2.5))) / 2)
    loss.backward()
    has_grad = logits.grad.abs().sum(dim=1).view(-1) > 0
    assert has_grad.nonzero().view(-1).tolist() == [1, 5]


def test_top_count_rounds_up_without_float_noise():
    assert top_count(0.07, 100) == 7  # 0.07 * 100 == 7.000000000000001
    assert top_count(0.25, 8) == 2
    assert top_count(0.21, 10) == 3
    assert top_count(0.01, 10) == 1
    assert top_count(1.0, 7) == 7


# Columns 0-2 class 0, columns 3-5 class 1, one ignored pixel at the bottom left.
EDGE_TARGET = [[0, 0, 0, 1, 1, 1]] * 4 + [[IGN, 0, 0, 1, 1, 1]]


@pytest.mark.parametrize(("width", "expected"), [
    (1, [[0, 0, 1, 1, 0, 0],
         [0, 0, 1, 1, 0, 0],
         [0, 0, 1, 1, 0, 0],
         [1, 1, 1, 1, 0, 0],
         [0, 1, 1, 1, 0, 0]]),
    (2, [[0, 1, 1, 1, 1, 0],
         [0, 1, 1, 1, 1, 0],
         [1, 1, 1, 1, 1, 0],
         [1, 1, 1, 1, 1, 0],
         [0, 1, 1, 1, 1, 0]]),
])
def test_boundary_mask_is_the_band_around_label_edges(width, expected):
    # The image border is no edge; the ignored pixel is outside the band but its neighbours are in.
    band = boundary_mask(torch.tensor([EDGE_TARGET]), 2, IGN, width)
    assert band[0].int().tolist() == expected


def test_boundary_is_ce_over_the_band_and_zero_far_from_edges():
    logits = torch.randn(1, 2, 5, 6, generator=torch.Generator().manual_seed(0)).requires_grad_()
    target = torch.tensor([EDGE_TARGET])
    loss = make_loss("boundary", num_classes=2, boundary_width=1)(logits, target)
    band = boundary_mask(target, 2, IGN, 1)[0]
    values = logits[0].detach().tolist()
    band_px = [([values[0][i][j], values[1][i][j]], EDGE_TARGET[i][j])
               for i in range(5) for j in range(6) if band[i, j]]
    assert len(band_px) == 13
    assert loss.item() == pytest.approx(ce_hand(band_px), abs=1e-5)
    loss.backward()
    has_grad = logits.grad.abs().sum(dim=1)[0] > 0
    assert torch.equal(has_grad, band)  # nothing outside the band (columns 4-5, the ignored pixel)

    changed = logits.detach().clone()
    changed[0, :, :3, :2] = torch.tensor([-9.0, 9.0]).view(2, 1, 1)  # far from edges, badly wrong
    changed[0, :, :, 4:] = torch.tensor([9.0, -9.0]).view(2, 1, 1)
    assert make_loss("boundary", num_classes=2, boundary_width=1)(changed, target).item() == loss.item()


def test_boundary_without_edges_is_zero_with_a_graph():
    logits = torch.tensor([[[[5.0, 5.0], [5.0, 5.0]], [[-5.0, -5.0], [-5.0, -5.0]]]], requires_grad=True)
    loss = make_loss("boundary", num_classes=2)(logits, torch.ones(1, 2, 2, dtype=torch.int64))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("ignore_index", [255, 3])  # 3 == num_classes, like CamVid's 11
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_ignored_pixels_have_no_effect(name, ignore_index):
    gen = torch.Generator().manual_seed(1)
    target = torch.randint(0, 3, (2, 6, 6), generator=gen)
    ignored = torch.rand(2, 6, 6, generator=gen) < 0.3
    target[ignored] = ignore_index
    logits = torch.randn(2, 3, 6, 6, generator=gen)
    loss_fn = make_loss(name, ignore_index=ignore_index)

    def loss_and_grad(x):
        x = x.clone().requires_grad_()
        loss = loss_fn(x, target)
        loss.backward()
        return loss.item(), x.grad

    base, grad = loss_and_grad(logits)
    assert math.isfinite(base) and base > 0
    assert grad.abs().sum(dim=1)[ignored].max().item() == 0.0
    assert grad.abs().sum(dim=1)[~ignored].max().item() > 0
    for fill in (torch.randn(2, 3, 6, 6, generator=gen) * 100, torch.full((2, 3, 6, 6), math.nan)):
        changed = torch.where(ignored.unsqueeze(1), fill, logits)
        loss, changed_grad = loss_and_grad(changed)
        assert loss == base
        assert torch.equal(changed_grad, grad)


@pytest.mark.parametrize("ignore_index", [255, 3])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_batch_with_only_ignored_pixels_gives_zero_not_nan(name, ignore_index):
    # smp's FocalLoss gives NaN and LovaszLoss a (0, C) tensor here; torch's CE gives NaN.
    logits = torch.randn(1, 3, 3, 3, requires_grad=True)
    loss = make_loss(name, ignore_index=ignore_index)(logits, torch.full((1, 3, 3), ignore_index))
    assert loss.shape == () and loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gradients_flow(name):
    gen = torch.Generator().manual_seed(2)
    target = torch.randint(0, 3, (1, 6, 6), generator=gen)
    target[0, 0, :] = IGN
    logits = torch.randn(1, 3, 6, 6, generator=gen, requires_grad=True)
    make_loss(name)(logits, target).backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_half_precision_logits_are_computed_in_float32():
    logits = torch.tensor([LOGITS], dtype=torch.bfloat16)
    loss = build_loss(loss_params(terms={"ce": 0.5, "dice": 0.5}), 3, IGN)(
        logits, torch.tensor([TARGETS["all_classes"]]))
    assert loss.dtype == torch.float32


def test_terms_expose_weight_and_module():
    loss = build_loss(loss_params(terms={"ce": 0.7, "boundary": 0.3}, boundary_width=2), 3, IGN)
    (w_ce, ce), (w_b, boundary) = loss.terms["ce"], loss.terms["boundary"]
    assert (w_ce, w_b) == (0.7, 0.3)
    assert isinstance(ce, CrossEntropy) and isinstance(boundary, BoundaryCrossEntropy)
    assert boundary.width == 2 and boundary.ignore_index == IGN


def test_wrong_inputs_are_clear_errors():
    loss = build_loss(loss_params(), 3, IGN)
    with pytest.raises(ValueError, match="target must be"):
        loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="unknown loss term 'nope'"):
        build_loss(LossParams.model_construct(terms={"nope": 1.0}), 3, IGN)
    with pytest.raises(ValueError, match="weighted_ce needs class weights"):
        build_loss(LossParams.model_construct(terms={"weighted_ce": 1.0}), 3, IGN)
    with pytest.raises(ValueError, match="loss.class_weights has 2 values, the dataset has 3"):
        build_loss(loss_params(terms={"weighted_ce": 1.0}, class_weights=[1.0, 2.0]), 3, IGN, [1.0, 2.0])


CARD = {"train_statistics": {"weights": {"median_frequency": [0.5, 2.0, 1.25], "enet": [1.5, 10, 3.0]}}}


def test_resolve_class_weights_from_the_card_a_list_or_none():
    assert resolve_class_weights(loss_params(class_weights="median_frequency"), CARD, 3) == [0.5, 2.0, 1.25]
    assert resolve_class_weights(loss_params(class_weights="enet"), CARD, 3) == [1.5, 10.0, 3.0]
    assert resolve_class_weights(loss_params(class_weights=[1, 2, 3]), CARD, 3) == [1.0, 2.0, 3.0]
    assert resolve_class_weights(loss_params(), CARD, 3) is None


@pytest.mark.parametrize(("given", "card", "message"), [
    ([1.0, 2.0], CARD, "loss.class_weights: the list has 2 values, the dataset has 3 classes"),
    ("enet", {"train_statistics": {"weights": {"enet": [1.0, 2.0]}}}, "the card's 'enet' weights has 2"),
    ("enet", {"train_statistics": {"weights": {}}}, "scheme 'enet' is not in the dataset card"),
    ([1.0, -1.0, 2.0], CARD, "must be non-negative"),
])
def test_resolve_class_weights_errors_name_the_key(given, card, message):
    with pytest.raises(ValueError, match=message):
        resolve_class_weights(loss_params(class_weights=given), card, 3)
