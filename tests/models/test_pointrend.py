"""PointRend (``pipeline.models.seed.pointrend``): where it samples its points, what the point
head replaces at inference, and how its own loss reaches the training loss through
``SegmentationModel`` and the task."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.models.base import ModelMeta, SegmentationModel, TrainingOutput
from pipeline.models.seed import pointrend
from pipeline.models.seed.pointrend import PointRend, point_sample, training_points, uncertain_cells
from pipeline.models.smp import encoder
from pipeline.tasks import get_task

CLASSES = 3


def test_training_points_favour_the_uncertain_region():
    """Left half: two classes tie (uncertain); right half: one class wins by far."""
    torch.manual_seed(0)
    coarse = torch.zeros(2, CLASSES, 16, 16)
    coarse[:, 0, :, 8:] = 10.0
    points = training_points(coarse, 400)
    assert points.shape == (2, 400, 2) and points.min() >= 0 and points.max() <= 1
    left = (points[..., 0] < 0.5).float().mean().item()
    # 75 % chosen by uncertainty (all from the left half) plus half of the 25 % random ones.
    assert left == pytest.approx(0.75 + 0.25 / 2, abs=0.05)


def test_uncertain_cells_are_the_centres_of_the_least_certain_cells():
    logits = torch.zeros(1, CLASSES, 4, 6)
    logits[0, 0] = 5.0
    logits[0, 0, 2, 5] = 0.0          # the one tie
    logits[0, 0, 1, 0] = 0.5          # the next closest
    index, centres = uncertain_cells(logits, 2)
    assert index.tolist() == [[2 * 6 + 5, 1 * 6 + 0]]
    assert torch.allclose(centres, torch.tensor([[[5.5 / 6, 2.5 / 4], [0.5 / 6, 1.5 / 4]]]))


def test_point_sample_reads_a_cell_s_value_at_its_centre():
    maps = torch.arange(12.0).view(1, 1, 3, 4)
    centres = torch.tensor([[[0.5 / 4, 0.5 / 3], [3.5 / 4, 2.5 / 3]]])
    assert point_sample(maps, centres).flatten().tolist() == pytest.approx([0.0, 11.0], abs=1e-5)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return PointRend(encoder("resnet18", None, 3, pointrend.OUTPUT_STRIDE), CLASSES, train_points=64,
                     subdivision_points=10_000)


def test_inference_replaces_the_uncertain_cells_with_the_point_head_s_answers(net):
    """With more subdivision points than cells, the last doubling re-predicts every cell: the
    output is the point head at every cell centre of the input-sized grid."""
    net.eval()
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        out = net(x)
        features = net.encoder(x)
        fine, coarse = features[pointrend.FINE_LEVEL], net.coarse_head(features[-1])
        index, centres = uncertain_cells(torch.zeros(1, CLASSES, 32, 48), 32 * 48)
        centres = centres[:, torch.argsort(index[0])]        # back to row-major order
        expected = net.point_head(point_sample(fine, centres), point_sample(coarse, centres))
    expected = expected.view(1, CLASSES, 32, 48)
    assert out.shape == (1, CLASSES, 32, 48)
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, F.interpolate(coarse, size=(32, 48), mode="bilinear"), atol=1e-3)


def test_the_point_loss_is_zero_not_nan_when_every_label_is_ignored(net):
    net.train()
    out = net(torch.randn(2, 3, 32, 32))
    assert isinstance(out, TrainingOutput) and out.logits.shape == (2, CLASSES, 32, 32)
    assert out.loss(torch.full((2, 32, 32), 255), 255).item() == 0.0
    assert out.loss(torch.zeros(2, 32, 32, dtype=torch.long), 255).item() > 0


class OwnLossNet(nn.Module):
    """Returns zero logits and records the targets its own loss is given."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, x):
        logits = x[:, :CLASSES] * 0 + self.weight

        def loss(targets, ignore_index):
            self.seen.append((targets.clone(), ignore_index))
            return torch.tensor(5.0)

        return TrainingOutput(logits, loss)


def test_the_model_pads_the_targets_with_the_ignore_label_and_the_task_adds_the_own_loss():
    net = OwnLossNet()
    model = SegmentationModel(net, ModelMeta(ignore_index=7), multiple=8)
    x, y = torch.randn(2, 3, 13, 10), torch.zeros(2, 13, 10, dtype=torch.long)
    ce = nn.CrossEntropyLoss()
    loss = get_task("semantic").training_loss(model, x, y, ce)
    assert loss.item() == pytest.approx(ce(torch.zeros(2, CLASSES, 13, 10), y).item() + 5.0)
    targets, ignore = net.seen[-1]
    assert ignore == 7 and targets.shape == (2, 16, 16)
    assert (targets[:, :13, :10] == 0).all()
    assert (targets[:, 13:] == 7).all() and (targets[:, :, 10:] == 7).all()
