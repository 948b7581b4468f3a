"""conv2former-pretrain: the Conv2Former model library, data path and DeepSpeed training engine.

Importing the package registers every Conv2Former variant with timm.
"""

from conv2former.model import VARIANTS, Conv2Former, Conv2FormerIsotropic  # noqa: F401  (registers with timm)

__version__ = "0.1.0"
