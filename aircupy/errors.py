"""The exceptions aircupy raises for bad input; the CLI and server turn them into one-line messages."""
from __future__ import annotations


class AircupyError(Exception):
    """Base of every error caused by input (files, arguments, requests) rather than a bug."""


class GGUFError(AircupyError, ValueError):
    """A GGUF file is malformed: names the file, what is wrong and the byte offset where it was found."""

    def __init__(self, path, message: str, offset: int | None = None):
        self.path = str(path)
        self.offset = offset
        where = f" at byte {offset}" if offset is not None else ""
        super().__init__(f"{self.path}: {message}{where}")
        self.reason = message


class UnsupportedModelError(AircupyError):
    """Architecture, tensor type or tensor layout aircupy cannot run (names what is missing)."""


class ContextLengthError(AircupyError):
    """A prompt (with its requested tokens) does not fit the model's context window."""


class InvalidParameterError(AircupyError, ValueError):
    """A sampling or engine parameter is out of range; `param` names it (for the OpenAI error object)."""

    def __init__(self, param: str, message: str):
        self.param = param
        super().__init__(f"{param}: {message}")


class BackendUnavailableError(AircupyError):
    """The requested compute backend cannot run here (no cupy, no CUDA device); says how to fix it."""


class TemplateError(AircupyError):
    """A chat template failed to render or tried something the sandbox forbids."""


class UnsafeTemplateError(TemplateError):
    """A chat template reached for something the sandbox forbids (Python internals) or for more memory or
    work than a render is allowed: the file is hostile or broken, whatever the conversation."""
