"""torch.hub entry points of dinokit (DINO, Caron et al. 2021), for a local checkout:

    model = torch.hub.load("/path/to/dinokit", "dino_vits16", source="local", weights="dino_vits16.pth")

``dino_vits16``, ``dino_vits8``, ``dino_vitb16``, ``dino_vitb8`` and ``dino_resnet50`` build the reference
architectures and load a local weights file when ``weights=`` is given (official ``.pth`` releases, training
checkpoints, dinokit ``.safetensors`` exports); nothing is ever downloaded. See ``dinokit/hub.py``.
"""

import os
import sys

dependencies = ["torch", "torchvision", "safetensors", "numpy", "yaml", "tqdm"]

try:
    import dinokit  # noqa: F401
except ImportError:  # a plain checkout (not pip-installed): use its src/ directory
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from dinokit.hub import dino_resnet50, dino_vitb8, dino_vitb16, dino_vits8, dino_vits16  # noqa: E402

__all__ = ["dino_vits16", "dino_vits8", "dino_vitb16", "dino_vitb8", "dino_resnet50"]
