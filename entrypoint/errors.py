"""The errors the action raises for anything a user should read: one base that carries the message for
the person running the workflow (and the input to fix, if any), and a subclass per cause with the data
the code decides on (HTTP status, whether a retry can help, the tool, the path and the sizes). Retries and
crash handling branch on the type and that data, never on the message.

Every message follows one pattern: what happened, why (the file, value or answer at fault), the fix, and
(added where it is shown) the README section on that failure: `anchor`, a heading or an `<a id>` of the
README's failure table (tests/test_errors.py checks each exists)."""

from __future__ import annotations

from pathlib import Path


class PublishError(Exception):
    """A failure with a message written for the person running the workflow.

    `input_name` names the action input at fault (if any) so the message can point at the fix;
    `retriable` says whether trying the same step again may succeed.
    """

    retriable = False
    section = "failure-modes-and-re-runs"  # each subclass names its own


    def __init__(self, message: str, *, input_name: str | None = None, title: str | None = None):
        super().__init__(message)
        self.message = message
        self.input_name = input_name
        self.title = title or (f"Invalid input '{input_name}'" if input_name else "ollama-publish failed")

    @property
    def anchor(self) -> str:
        """The README section on this failure (for some types, chosen by their data)."""
        return self.section

    @property
    def shown(self) -> str:
        """The message as the log and summary show it: it always names the input at fault."""
        if self.input_name and self.input_name not in self.message:
            return f"{self.message} (input: {self.input_name})"
        return self.message

    def __str__(self) -> str:
        return self.message


class InputError(PublishError):
    """An input is wrong; `input_name` says which."""

    section = "invalid-input"

    def __init__(self, message: str, *, input_name: str):
        super().__init__(message, input_name=input_name)


class RepoRefused(PublishError):
    """The checkpoint (its files, config, template or what its server answers) cannot be published as it is."""

    section = "cannot-convert"


class RemoteCodeRefused(RepoRefused):
    """The repository would run code of its own or from elsewhere: declared in its files (refused before
    conversion), or attempted by a sealed tool reading them (`attempt`: "code" or "network"; the tool was
    stopped before it ran any)."""

    section = "repository-code"

    def __init__(self, message: str, *, attempt: str, input_name: str | None = None):
        super().__init__(message, input_name=input_name, title="Repository code refused")
        self.attempt = attempt


class LimitExceeded(PublishError):
    """A process that reads the repository's files went past a limit the kernel keeps (`resource`:
    "memory", "cpu" or "time"; `limit` in bytes or seconds) and was stopped."""

    section = "hostile-repository"

    def __init__(self, message: str, *, resource: str, limit: float, input_name: str | None = None,
                 title: str | None = None):
        super().__init__(message, input_name=input_name, title=title or "Limit exceeded")
        self.resource = resource
        self.limit = limit


class ServiceError(PublishError):
    """A server the action talks to (the Hub, a registry) failed or refused: `status` is its HTTP status
    (None when it did not answer at all); `retriable` whether it may answer another time."""

    def __init__(self, message: str, *, status: int | None, retriable: bool, input_name: str | None = None,
                 title: str | None = None):
        super().__init__(message, input_name=input_name, title=title)
        self.status = status
        self.retriable = retriable

    @property
    def anchor(self) -> str:
        return "network-drop" if self.retriable else self._refused_anchor()

    def _refused_anchor(self) -> str:
        return "failure-modes-and-re-runs"


class HubError(ServiceError):
    """The Hugging Face Hub (or the Hub-compatible server at HF_ENDPOINT)."""

    def _refused_anchor(self) -> str:
        return "hub-access"


class RegistryError(ServiceError):
    """The registry the models are pushed to (directly, or through Ollama's push)."""

    def _refused_anchor(self) -> str:
        return "push-refused" if self.status in (401, 403) else "registry-unreachable"


class OllamaError(PublishError):
    """Ollama did not do what it was asked: did not start, stopped, or did not finish a step in time."""

    section = "ollama-failed"


class OllamaUnreachable(OllamaError):
    """The Ollama server did not answer, or stopped answering mid-stream (it may have crashed)."""


class OllamaRefused(OllamaError):
    """Ollama answered a request with an error: an HTTP error status, or an error line in a stream (then
    `status` is the stream's own, 200); `detail` is Ollama's own error text."""

    def __init__(self, message: str, *, status: int, title: str, detail: str = ""):
        super().__init__(message, title=title)
        self.status = status
        self.detail = detail


class ToolMissing(PublishError):
    """A tool the action runs (the converter, a llama.cpp tool, Ollama) is not where it looks, or is not the
    version it expects: `tool`. Inside the image it never is; the CLI elsewhere needs scripts/bootstrap."""

    section = "running-outside-github"

    def __init__(self, message: str, *, tool: str):
        super().__init__(message, title=f"{tool} missing")
        self.tool = tool


class NotEnoughResources(PublishError):
    """The preflight: the run needs more of `resource` ("disk" or "memory") than there is, in bytes."""

    section = "not-enough-resources"

    def __init__(self, message: str, *, resource: str, needed: int, available: int):
        super().__init__(message, input_name="resource-check", title=f"Not enough {resource}")
        self.resource = resource
        self.needed = needed
        self.available = available


class LocalWriteFailed(PublishError):
    """Writing into `path` failed for another reason than a full disk (permissions, a read-only folder)."""

    section = "cannot-write"

    def __init__(self, message: str, *, path: Path, title: str):
        super().__init__(message, title=title)
        self.path = path


class ToolFailed(PublishError):
    """A tool the action runs (the converter, llama-quantize, ...) failed: `tool` and its `exit_code`."""

    section = "cannot-convert"

    def __init__(self, message: str, *, tool: str, exit_code: int | None, title: str | None = None):
        super().__init__(message, title=title or f"{tool} failed")
        self.tool = tool
        self.exit_code = exit_code


class ToolRaised(RepoRefused):
    """A Python tool (llama.cpp's converters) raised on the repository's files: `tool` and its `exception`
    ("Type: message (file:line)")."""

    section = "hostile-repository"

    def __init__(self, message: str, *, tool: str, exception: str, input_name: str | None = None):
        super().__init__(message, input_name=input_name, title=f"{tool} failed")
        self.tool = tool
        self.exception = exception


class DiskFull(PublishError):
    """The filesystem holding `path` is full: `free` bytes are left there; `needed`, when known, is what the
    step needed. Not retried: it does not free itself."""

    section = "disk-full"

    def __init__(self, path: Path, *, free: int, needed: int | None = None, what: str = ""):
        need = f"needs about {needed / 1e9:.2f} GB and " if needed is not None else ""
        super().__init__(f"The disk is full: {what or 'the run'} {need}the filesystem of {path} has "
                         f"{free / 1e9:.2f} GB free. Free space (on hosted runners remove /usr/share/dotnet and "
                         "/usr/local/lib/android), publish fewer quantizations, or use a bigger runner.",
                         title="Disk full")
        self.path = path
        self.free = free
        self.needed = needed


class CheckFailed(PublishError):
    """A check of the result failed: one subclass per check. Each sets its title (and its input)."""

    title_text = "Check failed"
    check_input: str | None = None

    def __init__(self, message: str):
        super().__init__(message, input_name=self.check_input, title=self.title_text)


class ParityFailed(CheckFailed):
    """Ollama's prompts differ from those the checkpoint's own chat template renders."""

    title_text = "Prompt parity failed"
    check_input = "template"
    section = "prompt-parity-failed"


class SmokeTestFailed(CheckFailed):
    """A model gave no answer, did not stop by itself, or (embeddings, vision) does not do its job."""

    title_text = "Smoke test failed"
    section = "smoke-test-failed"


class AlreadyPublished(CheckFailed):
    """The version's tags already hold other content, and published versions are immutable."""

    title_text = "Version already published"
    check_input = "overwrite"
    section = "already-published"


class PushNotVerified(CheckFailed):
    """After a push the registry does not hold the manifest Ollama built for the tag."""

    title_text = "Push not verified"
    section = "push-not-verified"


class PullCheckFailed(CheckFailed):
    """An empty Ollama could not pull a pushed tag back, or pulled other blobs than were pushed."""

    title_text = "Pull check failed"
    check_input = "pull-check"
    section = "pull-check-failed"
