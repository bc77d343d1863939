import math
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn import metrics as skm

from pipeline.metrics.confusion import ConfusionMatrix, confusion_matrix, segmentation_metrics

C = 6
IGNORE = 255
ABSENT = 3        # in neither truth nor prediction
ONLY_PREDICTED = 5  # predicted somewhere, never in the truth


def random_masks(seed: int, n: int = 3, h: int = 17, w: int = 23) -> tuple[torch.Tensor, torch.Tensor]:
    """(pred, target), (n, h, w) int64: ~10% ignore pixels, class ABSENT nowhere,
    class ONLY_PREDICTED only in pred."""
    rng = np.random.default_rng(seed)
    target = rng.choice([0, 1, 2, 4], size=(n, h, w), p=[0.5, 0.3, 0.15, 0.05])
    target[rng.random((n, h, w)) < 0.1] = IGNORE
    # Predictions right ~60% of the time, otherwise any class but ABSENT.
    noise = rng.choice([0, 1, 2, 4, ONLY_PREDICTED], size=(n, h, w))
    pred = np.where(rng.random((n, h, w)) < 0.6, target, noise)
    pred[pred == IGNORE] = 0  # the model predicts something at ignored pixels too
    return torch.from_numpy(pred), torch.from_numpy(target)


def labelled(pred: torch.Tensor, target: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    keep = target != IGNORE
    return target[keep].numpy(), pred[keep].numpy()


def test_matches_scikit_learn_with_ignore_and_absent_classes():
    pred, target = random_masks(0)
    y_true, y_pred = labelled(pred, target)
    labels = list(range(C))
    cm = confusion_matrix(pred, target, C, IGNORE)
    assert cm.dtype == torch.int64 and cm.shape == (C, C)
    np.testing.assert_array_equal(cm.numpy(), skm.confusion_matrix(y_true, y_pred, labels=labels))

    m = segmentation_metrics(cm)
    present = [c for c in labels if c != ABSENT]
    iou = np.array(m["iou"])
    dice = np.array(m["dice"])
    # sklearn scores the absent class 0 (zero_division); ours is NaN and left out of the means.
    assert math.isnan(iou[ABSENT]) and math.isnan(dice[ABSENT])
    sk_iou = skm.jaccard_score(y_true, y_pred, labels=present, average=None, zero_division=0)
    sk_dice = skm.f1_score(y_true, y_pred, labels=present, average=None, zero_division=0)
    np.testing.assert_allclose(iou[present], sk_iou, atol=1e-6)
    np.testing.assert_allclose(dice[present], sk_dice, atol=1e-6)
    assert m["miou"] == pytest.approx(sk_iou.mean(), abs=1e-6)
    assert m["mean_dice"] == pytest.approx(sk_dice.mean(), abs=1e-6)
    assert m["pixel_accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred), abs=1e-6)
    # Frequency-weighted IoU is IoU averaged with the truth pixel counts as weights.
    sk_fw = skm.jaccard_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)
    assert m["fw_iou"] == pytest.approx(sk_fw, abs=1e-6)

    # Precision is undefined for a class never predicted, recall for one never true.
    sk_precision = skm.precision_score(y_true, y_pred, labels=labels, average=None, zero_division=np.nan)
    sk_recall = skm.recall_score(y_true, y_pred, labels=labels, average=None, zero_division=np.nan)
    np.testing.assert_allclose(m["precision"], sk_precision, atol=1e-6)
    np.testing.assert_allclose(m["recall"], sk_recall, atol=1e-6)
    assert m["precision"][ONLY_PREDICTED] == 0.0 and math.isnan(m["recall"][ONLY_PREDICTED])
    assert iou[ONLY_PREDICTED] == 0.0  # predicted but never true: counts, as a 0


def test_imbalanced_image_scored_by_hand():
    # 100 pixels, a 5-pixel object, a model that predicts background everywhere.
    target = torch.zeros(1, 10, 10, dtype=torch.int64)
    target[0, 0, :5] = 1
    pred = torch.zeros_like(target)
    m = segmentation_metrics(confusion_matrix(pred, target, 2, IGNORE))
    assert m["pixel_accuracy"] == pytest.approx(0.95)
    assert m["iou"] == pytest.approx([0.95, 0.0])
    assert m["miou"] == pytest.approx(0.475)
    assert m["dice"] == pytest.approx([2 * 95 / (2 * 95 + 5), 0.0])
    assert m["dice"][0] == pytest.approx(0.974358974, abs=1e-9)
    assert m["mean_dice"] == pytest.approx(0.974358974 / 2, abs=1e-9)
    assert m["fw_iou"] == pytest.approx(0.95 * 0.95)
    assert m["precision"][0] == pytest.approx(0.95) and math.isnan(m["precision"][1])
    assert m["recall"] == pytest.approx([1.0, 0.0])


def test_two_batches_accumulate_to_one_big_batch():
    (p1, t1), (p2, t2) = random_masks(1, n=2), random_masks(2, n=3)
    acc = ConfusionMatrix(C, IGNORE)
    acc.update(p1, t1)
    acc.update(p2, t2)
    whole = confusion_matrix(torch.cat([p1, p2]), torch.cat([t1, t2]), C, IGNORE)
    assert torch.equal(acc.mat, whole)
    np.testing.assert_equal(acc.compute(), segmentation_metrics(whole))
    acc.reset()
    assert int(acc.mat.sum()) == 0


def test_update_takes_logits_and_argmaxes_them():
    pred, target = random_masks(3)
    # (N, C, H, W) scores whose argmax over C is pred
    logits = (torch.nn.functional.one_hot(pred, C) + 0.1 * torch.rand(*pred.shape, C)).permute(0, 3, 1, 2)
    from_logits, from_pred = ConfusionMatrix(C, IGNORE), ConfusionMatrix(C, IGNORE)
    from_logits.update(logits, target)
    from_pred.update(pred, target)
    assert torch.equal(from_logits.mat, from_pred.mat)
    with pytest.raises(ValueError, match="class scores"):
        from_logits.update(logits[:, :4], target)


def test_ignored_pixels_do_not_count_whatever_is_predicted_there():
    pred, target = random_masks(4)
    other = pred.clone()
    other[target == IGNORE] = (other[target == IGNORE] + 1) % C
    assert torch.equal(confusion_matrix(pred, target, C, IGNORE), confusion_matrix(other, target, C, IGNORE))
    assert int(confusion_matrix(pred, target, C, IGNORE).sum()) == int((target != IGNORE).sum())


def test_out_of_range_label_is_an_error_not_a_miscount():
    target = torch.tensor([[[0, 1], [2, 7]]])
    with pytest.raises(ValueError, match=r"outside 0\.\.5"):
        confusion_matrix(torch.zeros_like(target), target, C, IGNORE)


def test_empty_matrix_scores_nan():
    m = segmentation_metrics(torch.zeros(3, 3, dtype=torch.int64))
    assert math.isnan(m["miou"]) and math.isnan(m["pixel_accuracy"]) and math.isnan(m["fw_iou"])


def test_all_reduce_without_process_group_is_a_no_op():
    pred, target = random_masks(5)
    acc = ConfusionMatrix(C, IGNORE)
    acc.update(pred, target)
    before = acc.mat.clone()
    assert acc.all_reduce() is acc
    assert torch.equal(acc.mat, before)


def _rank_counts(rank: int, world: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        acc = ConfusionMatrix(C, IGNORE)
        acc.update(*random_masks(10 + rank))
        out[rank] = acc.all_reduce().mat.clone()
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_over_two_gloo_ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        # fork, not spawn: the children need no fresh interpreter importing torch again (~3 s).
        mp.start_processes(_rank_counts, args=(2, port, out), nprocs=2, join=True, start_method="fork")
        reduced = dict(out)
    expected = sum(confusion_matrix(*random_masks(10 + r), C, IGNORE) for r in range(2))
    assert torch.equal(reduced[0], expected) and torch.equal(reduced[1], expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_counts_on_gpu_equal_counts_on_cpu():
    pred, target = random_masks(6)
    acc = ConfusionMatrix(C, IGNORE)
    acc.update(pred.cuda(), target.cuda())
    assert acc.mat.is_cuda
    assert torch.equal(acc.mat.cpu(), confusion_matrix(pred, target, C, IGNORE))
