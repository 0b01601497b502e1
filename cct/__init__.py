"""cct: Compact Convolutional Transformers (CCT, CVT, ViT-Lite) you can train on a laptop CPU or one GPU.

Importing the package registers every variant with timm, so `timm.create_model("cct_7_3x1_32")` works too.
The rooms: `cct.models` (the architectures and their weights), `cct.data` (datasets, augmentation, batches),
`cct.train` (recipes, the training loop, evaluation, trained runs).
"""

from .models import convert_official_state_dict, create_model, list_models
from .models.explain import explain as explain

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "convert_official_state_dict", "__version__"]
