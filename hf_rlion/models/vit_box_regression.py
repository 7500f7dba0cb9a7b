"""ViT single-box regression: a ViT backbone whose flattened patch tokens feed an MLP head.

This is the model of the well-known "object detection with Vision Transformers" set-up on
Caltech101 (one box per image): 224x224 input cut into 32x32 patches (49 tokens), a small
ViT encoder (width 64, 4 layers, 4 heads, MLP width 128), the final LayerNorm'd patch tokens
flattened (49 * 64 = 3136 features) into an MLP head with hidden sizes
(2048, 1024, 512, 64, 32), GELU and dropout 0.3, ending in 4 outputs. Those defaults are the
public baseline's; here the last layer is followed by a sigmoid so the prediction is a
normalised box (x1, y1, x2, y2) in [0, 1], its corners ordered (min, max) so that it is
always a valid box. The last layer's bias starts at logit(0.25, 0.25, 0.75, 0.75), so the
untrained model predicts the centred half-size box instead of a zero-area one.

Losses (``config.loss``):
    ``"mse"``  (default, the baseline's): mean over the batch and the 4 coordinates of
               (pred - target)^2.
    ``"giou"``: mean of 1 - GIoU(pred, target), where for boxes A, B with smallest enclosing
               box C, GIoU = IoU - (area(C) - area(A u B)) / area(C) (Rezatofighi et al.
               2019).

With ``config.class_head=True`` a linear layer on the mean of the patch tokens also predicts
the category
(``config.num_labels`` classes, names in ``config.id2label``), trained with cross-entropy
added to the box loss with weight ``config.class_loss_weight`` (default 0.1).

The config and the model are registered with ``AutoConfig`` / ``AutoModel`` when
``hf_rlion.models`` is imported, so ``AutoModel.from_pretrained(path)`` works after
``import hf_rlion.models``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ViTConfig, ViTModel, ViTPreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

BOX_LOSSES = ("mse", "giou")
INITIAL_BOX = (0.25, 0.25, 0.75, 0.75)  # what the untrained head predicts (output bias)


class ViTBoxRegressionConfig(ViTConfig):
    """``ViTConfig`` plus the box head. Defaults reproduce the public Caltech101 baseline model.

    ViT part (defaults from the baseline, not from ``ViTConfig``): ``image_size=224``,
    ``patch_size=32``, ``hidden_size=64``, ``num_hidden_layers=4``, ``num_attention_heads=4``,
    ``intermediate_size=128`` (the baseline's transformer MLP ``[2*64, 64]``),
    ``hidden_dropout_prob=0.1`` (the baseline's dropout inside the transformer blocks).

    Head: ``head_hidden_sizes`` (default ``(2048, 1024, 512, 64, 32)``), ``head_dropout``
    (0.3, also applied to the flattened tokens as in the baseline), ``loss`` in
    ``("mse", "giou")``, ``class_head`` (bool) and ``class_loss_weight`` (0.1: the
    cross-entropy is O(1) while the box MSE is O(0.01); at weight 1 it dominated the shared
    encoder and the box IoU suffered in a small probe).
    """

    model_type = "vit_box_regression"

    image_size: int | list[int] | tuple[int, int] = 224
    patch_size: int | list[int] | tuple[int, int] = 32
    hidden_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 128
    hidden_dropout_prob: float | int = 0.1
    head_hidden_sizes: list[int] | tuple[int, ...] = (2048, 1024, 512, 64, 32)
    head_dropout: float | int = 0.3
    loss: str = "mse"
    class_head: bool = False
    class_loss_weight: float | int = 0.1

    def __post_init__(self, **kwargs):
        if self.loss not in BOX_LOSSES:
            raise ValueError(f"loss must be one of {BOX_LOSSES}, got {self.loss!r}")
        if not 0.0 <= float(self.head_dropout) < 1.0:
            raise ValueError(f"head_dropout must be in [0, 1), got {self.head_dropout!r}")
        sizes = list(self.head_hidden_sizes)
        if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
            raise ValueError(f"head_hidden_sizes must be positive integers, got {self.head_hidden_sizes!r}")
        self.head_hidden_sizes = sizes
        super().__post_init__(**kwargs)

    @property
    def num_patches(self) -> int:
        size = self.image_size if isinstance(self.image_size, (list, tuple)) else (self.image_size,) * 2
        patch = self.patch_size if isinstance(self.patch_size, (list, tuple)) else (self.patch_size,) * 2
        return (size[0] // patch[0]) * (size[1] // patch[1])


@dataclass
class ViTBoxRegressionOutput(ModelOutput):
    """``pred_boxes``: (batch, 4) normalised (x1, y1, x2, y2); ``logits``: (batch, num_labels) or None."""

    loss: Optional[torch.Tensor] = None
    pred_boxes: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    box_loss: Optional[torch.Tensor] = None


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of (x1, y1, x2, y2) boxes; a box with x2 < x1 or y2 < y1 has area 0."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Element-wise IoU of matching rows: |A n B| / |A u B| (0 where the union is empty).

    IoU is unchanged by scaling x and y axes, so normalised boxes give the pixel IoU.
    """
    lt = torch.maximum(pred[..., :2], target[..., :2])
    rb = torch.minimum(pred[..., 2:], target[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(pred) + box_area(target) - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(union))


def generalized_box_iou(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Element-wise GIoU = IoU - (|C| - |A u B|) / |C|, C the smallest box enclosing A and B
    (both boxes must have x1 <= x2, y1 <= y2)."""
    lt = torch.maximum(pred[..., :2], target[..., :2])
    rb = torch.minimum(pred[..., 2:], target[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(pred) + box_area(target) - inter
    enclosing = (torch.maximum(pred[..., 2:], target[..., 2:]) - torch.minimum(pred[..., :2], target[..., :2])).prod(-1)
    # Clamped (not eps added) so that small boxes get their exact GIoU; eps only guards 0 / 0.
    return inter / union.clamp(min=eps) - (enclosing - union) / enclosing.clamp(min=eps)


def ordered_corners(boxes: torch.Tensor) -> torch.Tensor:
    """(min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)): a valid box for any 4 numbers."""
    return torch.cat([torch.minimum(boxes[..., :2], boxes[..., 2:]), torch.maximum(boxes[..., :2], boxes[..., 2:])], -1)


class ViTBoxRegressionModel(ViTPreTrainedModel):
    """ViT encoder -> LayerNorm'd patch tokens flattened -> MLP -> sigmoid -> (x1, y1, x2, y2)."""

    config_class = ViTBoxRegressionConfig
    config: ViTBoxRegressionConfig

    def __init__(self, config: ViTBoxRegressionConfig):
        super().__init__(config)
        self.vit = ViTModel(config, add_pooling_layer=False)
        layers: list[nn.Module] = [nn.Flatten(), nn.Dropout(config.head_dropout)]
        width = config.num_patches * config.hidden_size
        for size in config.head_hidden_sizes:
            layers += [nn.Linear(width, size), nn.GELU(), nn.Dropout(config.head_dropout)]
            width = size
        layers.append(nn.Linear(width, 4))
        self.box_head = nn.Sequential(*layers)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.class_head else None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        box_head = getattr(self, "box_head", None)
        if box_head is not None and module is box_head[-1]:
            # Start from the centred box (0.25, 0.25, 0.75, 0.75) rather than sigmoid(0) = 0.5
            # for every corner, a zero-area box from which the GIoU loss does not recover.
            init.copy_(module.bias, torch.logit(torch.tensor(INITIAL_BOX, dtype=module.bias.dtype)))

    @classmethod
    def from_pretrained_backbone(cls, backbone_path: str, **config_overrides) -> "ViTBoxRegressionModel":
        """A new box model whose ViT encoder is loaded from ``backbone_path`` (a ViT checkpoint
        folder or Hub id); the head is freshly initialised. ``config_overrides`` set head options
        (``head_hidden_sizes``, ``loss``, ...); the encoder's shape comes from the checkpoint."""
        backbone = ViTModel.from_pretrained(backbone_path, add_pooling_layer=False)
        backbone_config = backbone.config.to_dict()
        for key in ("model_type", "architectures", "transformers_version"):
            backbone_config.pop(key, None)
        model = cls(ViTBoxRegressionConfig(**{**backbone_config, **config_overrides}))
        missing, unexpected = model.vit.load_state_dict(backbone.state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(f"backbone {backbone_path!r} does not fit: missing {missing}, unexpected {unexpected}")
        return model

    def forward(
        self,
        pixel_values: torch.Tensor,
        boxes: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> ViTBoxRegressionOutput:
        """``boxes`` (batch, 4) normalised targets and ``labels`` (batch,) category ids are optional;
        given, the loss is returned."""
        tokens = self.vit(pixel_values).last_hidden_state  # (batch, 1 + patches, hidden), LayerNorm'd
        # Corners ordered, so every prediction is a valid box (with GIoU the raw outputs may
        # come out as (x2, y2, x1, y1): the loss does not see the order, IoU would).
        pred_boxes = ordered_corners(torch.sigmoid(self.box_head(tokens[:, 1:]).float()))
        logits = self.classifier(tokens[:, 1:].mean(1)).float() if self.classifier is not None else None

        loss = box_loss = None
        if boxes is not None:
            boxes = boxes.to(pred_boxes.dtype)
            if self.config.loss == "mse":
                box_loss = F.mse_loss(pred_boxes, boxes)
            else:
                box_loss = (1.0 - generalized_box_iou(pred_boxes, boxes)).mean()
            loss = box_loss
        if logits is not None and labels is not None:
            class_loss = F.cross_entropy(logits, labels) * self.config.class_loss_weight
            loss = class_loss if loss is None else loss + class_loss
        return ViTBoxRegressionOutput(loss=loss, pred_boxes=pred_boxes, logits=logits, box_loss=box_loss)
