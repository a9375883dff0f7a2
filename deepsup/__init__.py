"""deepsup: deep supervision for any PyTorch model, in one line, without touching its code.

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

from . import diagnostics as diagnostics
from . import exits as exits
from . import heads as heads
from . import losses as losses
from . import multiscale as multiscale
from . import schedules as schedules
from ._discovery import TapInfo as TapInfo
from ._discovery import format_taps as format_taps
from ._discovery import list_taps as list_taps
from ._errors import CaptureError as CaptureError
from ._errors import ChannelInferenceError as ChannelInferenceError
from ._errors import CheckpointError as CheckpointError
from ._errors import ConfigError as ConfigError
from ._errors import ConfigTypeError as ConfigTypeError
from ._errors import DeepSupError as DeepSupError
from ._errors import DeepSupScriptError as DeepSupScriptError
from ._errors import DeepSupWarning as DeepSupWarning
from ._errors import EarlyExitError as EarlyExitError
from ._errors import HeadError as HeadError
from ._errors import MissingDependencyError as MissingDependencyError
from ._errors import TapNotFoundError as TapNotFoundError
from ._errors import TapOutputError as TapOutputError
from ._errors import TargetError as TargetError
from ._errors import UsageError as UsageError
from ._state import model_state_dict as model_state_dict
from ._state import param_groups as param_groups
from ._taps import Tap as Tap
from ._version import __version__ as __version__
from .exits import EarlyExit as EarlyExit
from .wrapper import AuxLosses as AuxLosses
from .wrapper import DeepSupervision as DeepSupervision
from .wrapper import HeadDict as HeadDict

__all__ = [
    "AuxLosses",
    "CaptureError",
    "ChannelInferenceError",
    "CheckpointError",
    "ConfigError",
    "ConfigTypeError",
    "DeepSupError",
    "DeepSupScriptError",
    "DeepSupWarning",
    "DeepSupervision",
    "EarlyExit",
    "EarlyExitError",
    "HeadDict",
    "HeadError",
    "MissingDependencyError",
    "Tap",
    "TapInfo",
    "TapNotFoundError",
    "TapOutputError",
    "TargetError",
    "UsageError",
    "__version__",
    "diagnostics",
    "exits",
    "format_taps",
    "heads",
    "list_taps",
    "losses",
    "model_state_dict",
    "multiscale",
    "param_groups",
    "schedules",
]
