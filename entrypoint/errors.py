"""The one error type the action raises for anything a user should read."""


class PublishError(Exception):
    """A failure with a message written for the person running the workflow.

    `input_name` names the action input at fault (if any) so the message can point at the fix.
    """

    def __init__(self, message: str, *, input_name: str | None = None, title: str | None = None):
        super().__init__(message)
        self.message = message
        self.input_name = input_name
        self.title = title or (f"Invalid input '{input_name}'" if input_name else "ollama-publish failed")

    @property
    def shown(self) -> str:
        """The message as the log and summary show it: it always names the input at fault."""
        if self.input_name and self.input_name not in self.message:
            return f"{self.message} (input: {self.input_name})"
        return self.message

    def __str__(self) -> str:
        return self.message


class OllamaUnreachable(PublishError):
    """The Ollama server did not answer, or stopped answering mid-stream (it may have crashed)."""


class OllamaRefused(PublishError):
    """Ollama answered a request with an error: an HTTP error status, or an error line in a stream (then
    `status` is the stream's own, 200)."""

    def __init__(self, message: str, *, status: int, title: str):
        super().__init__(message, title=title)
        self.status = status
