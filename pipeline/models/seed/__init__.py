"""The classic architectures the lecture notes teach that smp, torchvision and timm lack
(issue 19): plain ``nn.Module``s over (N, C, H, W) images returning (N, classes, H, W)
logits, for H and W multiples of their ``output_stride``; the model family pads any other
size (``pipeline.models.base``)."""
