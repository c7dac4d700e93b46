"""phi3tune's exceptions.

Spec validation raises pydantic's ValidationError; everything found at run time raises one of these.
Each subclasses the builtin a caller would already catch (ValueError / FileNotFoundError), and each
message names the field or path at fault and says what would work.
"""

from __future__ import annotations


class Phi3TuneError(Exception):
    """Base class of every phi3tune runtime error."""


class ConfigError(Phi3TuneError, ValueError):
    """A combination of spec values that cannot work (e.g. bf16 on a device without it)."""


class ModelSourceError(Phi3TuneError, FileNotFoundError):
    """The model path or hub id cannot be found or is not a model."""


class TargetModulesError(Phi3TuneError, ValueError):
    """AdapterSpec.target_modules names layers the model does not have."""


class DataSourceError(Phi3TuneError, FileNotFoundError):
    """DataSpec.source cannot be found or loaded."""


class DataFormatError(Phi3TuneError, ValueError):
    """The data loaded but its rows do not fit the chosen format (missing column, bad line, empty)."""


class OutputDirError(Phi3TuneError, ValueError):
    """TrainSpec.output_dir holds another run, or cannot be written."""


class CheckpointError(Phi3TuneError, FileNotFoundError):
    """A checkpoint to resume from is missing or incomplete."""


class TrainingError(Phi3TuneError, ValueError):
    """Training stopped: non-finite loss or gradients."""


class TrainingInterrupted(Phi3TuneError, KeyboardInterrupt):  # type: ignore[misc]
    """Ctrl-C or SIGTERM stopped the run after a checkpoint was saved."""

    def __init__(self, message: str, checkpoint: str | None = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
