"""streamer: a streaming online-learning engine around a batch-aligned stateful LSTM."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import Config
from .errors import StreamerError
from .events import Event

if TYPE_CHECKING:
    from .forecaster import Forecaster, StepResult

__all__ = ["Config", "Event", "Forecaster", "StepResult", "StreamerError"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The core imports TensorFlow; load it only when it is asked for.
    if name in {"Forecaster", "StepResult"}:
        from . import forecaster

        return getattr(forecaster, name)
    raise AttributeError(f"module 'streamer' has no attribute {name!r}")
