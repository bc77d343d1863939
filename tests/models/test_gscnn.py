"""Gated-SCNN (``pipeline.models.seed.gscnn``): the label edges its shape stream learns, and its
dual-task loss."""

import pytest
import torch
from torch.nn import functional as F

from pipeline.models.seed.gscnn import boundary_consistency, dual_task_loss, label_edges

IGNORE = 255


def test_label_edges_are_the_labelled_pixels_beside_another_labelled_class():
    targets = torch.zeros(1, 6, 8, dtype=torch.long)
    targets[:, :, 4:] = 1                       # a vertical border between columns 3 and 4
    targets[:, :, 7] = IGNORE                   # an unlabelled column draws no edge
    edges = label_edges(targets, IGNORE)[0]
    assert edges[:, [3, 4]].all() and not edges[:, [0, 1, 2, 5, 6, 7]].any()


def test_the_dual_task_loss_is_zero_without_labels_and_rewards_the_right_boundaries():
    targets = torch.zeros(1, 6, 8, dtype=torch.long)
    targets[:, :, 4:] = 1
    logits = F.one_hot(targets, 2).permute(0, 3, 1, 2).float() * 30    # right scores: only the edges differ
    edges = label_edges(targets, IGNORE).float()
    right, wrong = (edges * 2 - 1) * 10, (1 - edges * 2) * 10
    assert dual_task_loss(logits, right, torch.full_like(targets, IGNORE), IGNORE).item() == 0.0
    good, bad = (dual_task_loss(logits, e, targets, IGNORE) for e in (right, wrong))
    assert good < 0.01 * bad


def test_the_regulariser_adds_cross_entropy_where_the_shape_stream_is_sure_of_a_boundary():
    targets = torch.zeros(1, 6, 8, dtype=torch.long)
    targets[:, :, 4:] = 1
    edges = label_edges(targets, IGNORE).float()
    sure = (edges * 2 - 1) * 10                 # sure of the boundary exactly on the edges
    good = F.one_hot(targets, 2).permute(0, 3, 1, 2).float() * 10
    bad = -good
    edge_only = dual_task_loss(good, sure, targets, IGNORE).item()
    with_regulariser = dual_task_loss(bad, sure, targets, IGNORE).item()
    expected = F.cross_entropy(bad, targets, reduction="none")[edges.bool()].mean().item()
    assert with_regulariser - edge_only == pytest.approx(expected - F.cross_entropy(
        good, targets, reduction="none")[edges.bool()].mean().item(), rel=1e-4)


def _step(shift: int = 0) -> torch.Tensor:
    """(1, 12, 16) labels: class 0 left of column 8 + shift, class 1 right of it."""
    targets = torch.zeros(1, 12, 16, dtype=torch.long)
    targets[:, :, 8 + shift:] = 1
    return targets


def test_boundary_consistency_is_zero_for_a_confident_copy_of_the_labels_and_grows_when_moved():
    targets = _step()
    copy = F.one_hot(targets, 2).permute(0, 3, 1, 2).float() * 30
    assert boundary_consistency(copy, targets, IGNORE).item() < 1e-6
    moved = F.one_hot(_step(3), 2).permute(0, 3, 1, 2).float() * 30
    assert boundary_consistency(moved, targets, IGNORE).item() == pytest.approx(0.5, abs=1e-3)
    unsure = torch.zeros(1, 2, 12, 16)               # no boundary predicted at all
    assert boundary_consistency(unsure, targets, IGNORE).item() == pytest.approx(0.5, abs=1e-3)


def test_boundary_consistency_draws_no_boundary_at_ignored_pixels_and_passes_gradients():
    targets = _step()
    targets[:, :, 12:] = IGNORE                      # an unlabelled band: its border is no boundary
    logits = F.one_hot(_step(), 2).permute(0, 3, 1, 2).float() * 30
    logits[:, :, :, 12:] = torch.randn(1, 2, 12, 4) * 30    # whatever is predicted there
    assert boundary_consistency(logits, targets, IGNORE).item() < 1e-6
    assert boundary_consistency(logits, torch.full_like(targets, IGNORE), IGNORE).item() == 0.0
    moved = (F.one_hot(_step(2), 2).permute(0, 3, 1, 2).float() * 3).requires_grad_()
    boundary_consistency(moved, targets, IGNORE).backward()
    assert moved.grad.abs().sum() > 0 and torch.isfinite(moved.grad).all()


def test_the_dual_task_loss_holds_the_predicted_boundaries_to_the_labels():
    targets = _step()
    edges = (label_edges(targets, IGNORE).float() * 2 - 1) * 10
    right = F.one_hot(targets, 2).permute(0, 3, 1, 2).float() * 30
    moved = F.one_hot(_step(3), 2).permute(0, 3, 1, 2).float() * 30
    difference = dual_task_loss(moved, edges, targets, IGNORE) - dual_task_loss(right, edges, targets, IGNORE)
    ce = F.cross_entropy(moved, targets, reduction="none")[label_edges(targets, IGNORE)].mean()
    assert difference.item() == pytest.approx(0.5 + ce.item(), rel=1e-3)
