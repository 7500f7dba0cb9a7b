"""Models used by the hf_rlion recipes, registered with the transformers Auto classes.

``import hf_rlion.models`` makes ``AutoConfig`` / ``AutoModel`` know ``vit_box_regression``,
so a saved or pushed :class:`ViTBoxRegressionModel` loads with ``AutoModel.from_pretrained``.
(``import hf_rlion`` alone does not import this module: it needs no model code.)
"""

from transformers import AutoConfig, AutoModel

from .vit_box_regression import (
    ViTBoxRegressionConfig,
    ViTBoxRegressionModel,
    ViTBoxRegressionOutput,
    box_iou,
    generalized_box_iou,
)

AutoConfig.register(ViTBoxRegressionConfig.model_type, ViTBoxRegressionConfig, exist_ok=True)
AutoModel.register(ViTBoxRegressionConfig, ViTBoxRegressionModel, exist_ok=True)

__all__ = [
    "ViTBoxRegressionConfig",
    "ViTBoxRegressionModel",
    "ViTBoxRegressionOutput",
    "box_iou",
    "generalized_box_iou",
]
