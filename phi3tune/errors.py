"""phi3tune's exceptions.

Spec validation raises pydantic's ValidationError; everything found at run time raises one of these.
Each subclasses the builtin a caller would already catch (ValueError / FileNotFoundError), and each
message names the field or path at fault and says what would work.

What would work is often an option, and options are spelled differently in Python (``resume=True``) and on
the command line (``--resume``). Such an error carries a ``Hint``: one sentence with the options as
``{placeholders}`` filled in by ``Say`` words. ``str(error)`` is the Python sentence (the API's message);
``error.cli_message()`` the command line's, which the CLI prints. Both come from one template, so they
cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Say:
    """One thing to tell the user, as the Python API spells it and as the command line does."""

    python: str
    cli: str


RESUME = Say("resume=True", "--resume")
OVERWRITE = Say("overwrite=True", "--overwrite")


def resume_from(checkpoint: str) -> Say:
    """Resuming from one named checkpoint."""
    return Say(f"resume={checkpoint!r}", f"--resume {checkpoint}")


@dataclass(frozen=True)
class Hint:
    """What to do next: ``template`` with ``{name}`` placeholders, each filled by a ``Say`` (or a plain string,
    the same in both spellings). Only the named placeholders are filled, so other braces stay as written."""

    template: str
    words: dict[str, Say | str]

    def render(self, cli: bool) -> str:
        text = self.template
        for name, word in self.words.items():
            said = word if isinstance(word, str) else word.cli if cli else word.python
            text = text.replace("{" + name + "}", said)
        return text


def hint(template: str, **words: Say | str) -> Hint:
    """``hint("pass {resume} to continue it", resume=RESUME)``."""
    return Hint(template, words)


class Phi3TuneError(Exception):
    """Base class of every phi3tune runtime error: ``problem`` and, optionally, a ``Hint`` of what would work."""

    def __init__(self, problem: str, hint: Hint | None = None) -> None:
        super().__init__(problem if hint is None else f"{problem}{hint.render(cli=False)}")
        self.problem, self.hint = problem, hint

    def cli_message(self) -> str:
        """The message with the command line's words (``--resume`` where Python says ``resume=True``)."""
        return str(self) if self.hint is None else f"{self.problem}{self.hint.render(cli=True)}"


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

    def __init__(self, problem: str, checkpoint: str | None = None, hint: Hint | None = None) -> None:
        super().__init__(problem, hint)
        self.checkpoint = checkpoint
