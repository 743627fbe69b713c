"""vmaptune: hyperparameter search that trains every config at once.

Sample configurations at random on the right scale, stack them along a lane
axis, train all of them in one ``jax.vmap``-ed, ``jax.jit``-compiled program,
then zoom in around the best, coarse to fine.

>>> import vmaptune as vt
>>> space = {"learning_rate": vt.loguniform(1e-4, 1e-1), "b1": vt.reverse_loguniform(0.9, 0.999)}
"""

from . import _devices

# Before anything else touches JAX: one CPU device per core (see _devices).
_devices.configure_cpu_devices()

from ._devices import enable_compilation_cache  # noqa: E402
from ._trial import AllDivergedError, Run, Stats, Trial  # noqa: E402
from ._result import SearchResult, load  # noqa: E402
from ._recheck import Recheck  # noqa: E402
from ._checkpoint import CheckpointError, CheckpointMismatch  # noqa: E402
from ._plan import OutOfMemoryError  # noqa: E402
from ._compiler import clear_cache  # noqa: E402
from ._zoom import Zoom  # noqa: E402
from ._halving import Halving  # noqa: E402
from ._pbt import PBT  # noqa: E402
from ._adaptive import Adaptive  # noqa: E402
from ._tpe import TPEModel  # noqa: E402
from ._search import search  # noqa: E402
from ._train import TrainState, train  # noqa: E402
from . import plot  # noqa: E402  (matplotlib is imported lazily, on first use)
from ._region import Region  # noqa: E402
from ._space import (  # noqa: E402
    Distribution,
    choice,
    integer,
    loguniform,
    reverse_loguniform,
    uniform,
)

__version__ = "0.1.0"

__all__ = [
    "search",
    "train",
    "load",
    "Zoom",
    "Halving",
    "PBT",
    "Adaptive",
    "TPEModel",
    "uniform",
    "loguniform",
    "reverse_loguniform",
    "integer",
    "choice",
    "SearchResult",
    "Recheck",
    "Trial",
    "Run",
    "TrainState",
    "Stats",
    "Distribution",
    "Region",
    "AllDivergedError",
    "CheckpointError",
    "CheckpointMismatch",
    "OutOfMemoryError",
    "clear_cache",
    "enable_compilation_cache",
    "plot",
]
