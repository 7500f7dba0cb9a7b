"""Models used by the hf_rlion recipes, registered with the transformers Auto classes.

``import hf_rlion.models`` makes ``AutoConfig`` / ``AutoModel`` know ``vit_box_regression``,
so a saved or pushed :class:`ViTBoxRegressionModel` loads with ``AutoModel.from_pretrained``.
(``import hf_rlion`` alone does not import this module: it needs no model code.)
"""

import transformers
from transformers import AutoConfig, AutoModel

if int(transformers.__version__.split(".")[0]) < 5:
    # The config is declared the transformers 5 way (annotated dataclass fields).
    raise ImportError(
        f"hf_rlion.models needs transformers>=5 (found {transformers.__version__}); "
        "the optimizers (import hf_rlion) work with older versions"
    )

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
