"""deepsup: deep supervision for any PyTorch model, in one line, without touching its code.

The top level holds what a training script uses; the rest lives in its submodules:
:mod:`deepsup.heads`, :mod:`deepsup.schedules`, :mod:`deepsup.losses`,
:mod:`deepsup.functional` (the pure functions every feature calls), :mod:`deepsup.exits`,
:mod:`deepsup.multiscale`, :mod:`deepsup.diagnostics` and :mod:`deepsup.errors`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from deepsup import DeepSupervision, heads
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3))
    >>> sup = DeepSupervision(model, {"0": 0.4}, head=heads.classification(3),
    ...                       criterion=nn.CrossEntropyLoss())
    >>> out, aux = sup(torch.randn(4, 8), target=torch.tensor([0, 1, 2, 0]))
    >>> list(aux)
    ['0']
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from . import balance as balance
from . import diagnostics as diagnostics
from . import errors as errors
from . import exits as exits
from . import functional as functional
from . import heads as heads
from . import losses as losses
from . import multiscale as multiscale
from . import schedules as schedules
from ._config import Tap as Tap
from ._discovery import list_taps as list_taps
from ._state import model_state_dict as model_state_dict
from ._state import param_groups as param_groups
from ._version import __version__ as __version__
from .errors import DeepSupError as DeepSupError
from .exits import EarlyExit as EarlyExit
from .layerdrop import LayerDropout as LayerDropout
from .speculative import SelfSpeculativeDecoder as SelfSpeculativeDecoder
from .wrapper import DeepSupervision as DeepSupervision

__all__ = [
    "DeepSupError",
    "DeepSupervision",
    "EarlyExit",
    "LayerDropout",
    "SelfSpeculativeDecoder",
    "Tap",
    "__version__",
    "balance",
    "diagnostics",
    "errors",
    "exits",
    "functional",
    "heads",
    "list_taps",
    "losses",
    "model_state_dict",
    "multiscale",
    "param_groups",
    "schedules",
]

# Names the top level had before 0.3, and where they live now (still reachable from here,
# with a DeprecationWarning).
_MOVED = {
    **{name: "errors" for name in errors.__all__ if name != "DeepSupError"},
    "AuxLosses": "wrapper",
    "HeadDict": "wrapper",
    "TapInfo": "diagnostics",
    "format_taps": "diagnostics",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        where = _MOVED[name]
        warnings.warn(
            f"deepsup.{name} moved to deepsup.{where}.{name}; import it from there",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(f"deepsup.{where}"), name)
    raise AttributeError(f"module 'deepsup' has no attribute {name!r}")
