"""streamer: a streaming online-learning engine around a batch-aligned stateful LSTM."""

from .config import Config
from .errors import StreamerError
from .events import Event
from .forecaster import Forecaster, StepResult

__all__ = ["Config", "Event", "Forecaster", "StepResult", "StreamerError"]
__version__ = "0.1.0"
