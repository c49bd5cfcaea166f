"""Typed errors. Every failure a user can cause names the file, field, tensor or limit at fault."""
from __future__ import annotations


class SlmkitError(Exception):
    """Base class of every error slmkit raises on purpose."""


class ModelFileError(SlmkitError):
    """A model file is missing, unreadable or corrupt. `path` names it."""

    def __init__(self, path: object, message: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")


class ConfigError(SlmkitError):
    """A configuration value is missing or invalid. `field` names it."""

    def __init__(self, field: str, message: str, *, path: object | None = None):
        self.field = field
        self.path = None if path is None else str(path)
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}field '{field}': {message}")


class UnsupportedModelError(SlmkitError):
    """The model_type (architecture) is not one slmkit implements."""


class WeightError(SlmkitError):
    """A tensor is missing, unexpected, or has the wrong shape or dtype. `tensor` names it."""

    def __init__(self, tensor: str, message: str, *, path: object | None = None):
        self.tensor = tensor
        self.path = None if path is None else str(path)
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}tensor '{tensor}': {message}")


class ContextLengthError(SlmkitError):
    """A prompt (plus requested tokens) does not fit the context. `limit` is the bound."""

    def __init__(self, length: int, limit: int, what: str = "context length", *, at_least: bool = False,
                 param: str | None = None):
        self.length = length  # with at_least, a lower bound (the text was too long to tokenize)
        self.limit = limit
        self.param = param  # the request field that is too long, when one is named (e.g. "input[2]")
        message = f"{'at least ' if at_least else ''}{length} tokens exceed the {what} of {limit} tokens"
        super().__init__(f"{param}: {message}" if param else message)


class InvalidRequestError(SlmkitError, ValueError):
    """A request (messages, parameters) is malformed. `param` names the offending field."""

    def __init__(self, message: str, *, param: str | None = None):
        self.param = param
        super().__init__(f"{param}: {message}" if param else message)


class UnsupportedInputError(InvalidRequestError):
    """The input kind (e.g. an image part) is not supported by this model."""


class UnsupportedByBackendError(InvalidRequestError):
    """An option or input the backend cannot honour: refused, never silently dropped. `param` (and
    `option`) names it, `backend` the backend ("github", "llamacpp", ...)."""

    def __init__(self, option: str, backend: str, why: str = ""):
        self.option, self.backend = option, backend
        super().__init__(f"is not supported by the {backend} backend" + (f" ({why})" if why else ""), param=option)


class ImageError(InvalidRequestError):
    """An image or video cannot be used: missing, empty, truncated, an unknown format, or over a limit.
    `param` names it (``images[0]``, ``video``), `file` is its path when it came from a file; the message
    names both and the limit at fault."""

    def __init__(self, message: str, *, param: str | None = None, file: object | None = None):
        self.file = None if file is None else str(file)
        where = (param or "image") + (f" ({self.file})" if self.file else "")
        SlmkitError.__init__(self, f"{where}: {message}")
        self.param = param


class MemoryPlanError(SlmkitError):
    """A planned allocation (e.g. the KV cache of continuous batching) does not fit the memory
    available. `needed` and `available` are in bytes."""

    def __init__(self, message: str, *, needed: int, available: int):
        self.needed, self.available = needed, available
        super().__init__(message)


class UnknownModelError(InvalidRequestError, LookupError):
    """A catalog name or tag that does not exist. `name` is what was asked for; `suggestions` the
    closest names (or, for an unknown tag, the tags that exist)."""

    def __init__(self, message: str, *, name: str, suggestions: list[str] | tuple[str, ...] = ()):
        self.name, self.suggestions = name, list(suggestions)
        super().__init__(message, param="model")


class DownloadError(SlmkitError):
    """A pull failed: offline, the hub or registry refused, or a file did not match its digest.
    `source` names what was being fetched."""

    def __init__(self, source: str, message: str):
        self.source = source
        super().__init__(f"{source}: {message}")


class EngineError(SlmkitError):
    """The engine failed while running a request, for a reason that is not the request's input
    (a fault in a shared batch step, or an engine thread that stopped). `dead` is True when the
    engine cannot run anything any more: every later request gets this error at once."""

    def __init__(self, message: str, *, dead: bool = False):
        self.dead = dead
        super().__init__(message)


class ModelNotFoundError(SlmkitError, LookupError):
    """No model of that name is served here. `name` is the name asked for, `served` the names
    that are (a server answers 404 model_not_found)."""

    def __init__(self, name: str | None, served: list[str] | tuple[str, ...] = ()):
        self.name, self.served = name, list(served)
        super().__init__(f"model {name!r} is not served here (served: {', '.join(self.served)})")


class ModelUnavailableError(SlmkitError):
    """A model could not be loaded: its loader failed (the cause is chained), or every loaded
    model is busy and none can make room (`busy`: try again later)."""

    def __init__(self, message: str, *, busy: bool = False):
        self.busy = busy
        super().__init__(message)


class ServerBusyError(SlmkitError):
    """The server's queue for a model is full (`waiting` requests): try again later."""

    def __init__(self, waiting: int):
        self.waiting = waiting
        super().__init__(f"{waiting} requests are waiting")


class BackendUnavailableError(SlmkitError):
    """A backend cannot run here: its optional extra is not installed (`extra`: what to pip install)
    or this platform lacks it."""

    def __init__(self, backend: str, message: str, *, extra: str | None = None):
        self.backend, self.extra = backend, extra
        hint = f" (pip install 'slmkit[{extra}]')" if extra else ""
        super().__init__(f"backend {backend}: {message}{hint}")


class ProviderError(SlmkitError):
    """A remote provider (a cloud, a running Ollama) refused or failed a request. `status`: its HTTP
    status (None: no answer); the message is the provider's, never a key or token."""

    def __init__(self, provider: str, message: str, *, status: int | None = None, retry_after: float | None = None):
        self.provider, self.status, self.retry_after = provider, status, retry_after
        where = f"{provider} answered HTTP {status}" if status is not None else provider
        super().__init__(f"{where}: {message}")


class ProviderAuthError(ProviderError):
    """The provider refused the credentials (401/403): a missing, wrong or under-scoped key."""


class ProviderRateLimitError(ProviderError):
    """The provider's rate limit (429), still hit after the retries; retry_after in seconds if it said."""


class ProviderUnreachableError(ProviderError):
    """No answer from the provider: offline, DNS, refused connection, or a timeout."""


class ProviderTimeoutError(ProviderUnreachableError):
    """The provider did not answer within the timeout (connect or read, after the retries)."""
