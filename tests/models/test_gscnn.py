"""Gated-SCNN (``pipeline.models.seed.gscnn``): the label edges its shape stream learns, and its
dual-task loss."""

import pytest
import torch
from torch.nn import functional as F

from pipeline.models.seed.gscnn import dual_task_loss, label_edges

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
    logits = torch.zeros(1, 2, 6, 8)
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
