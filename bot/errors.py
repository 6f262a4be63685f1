"""The exception tree.

BotError                 base of everything the bot raises on purpose
├── ConfigError          bad or missing configuration; names the key
├── CommandError         a /xwin command with a bad name or value; text is for the user
├── GenerationError      the engine failed to produce a reply
├── StoreError           the database is unusable (bad schema version...)
└── AdapterError         a platform adapter cannot start (bad token, missing intent...)
"""

from __future__ import annotations


class BotError(Exception):
    """Base of every error the bot raises on purpose."""


class ConfigError(BotError):
    """Configuration is invalid; the message names the key."""


class CommandError(BotError):
    """A command was given bad arguments; the message is shown to the user."""


#: What a chat user is told when generation failed inside the engine.
MODEL_FAILED = "the model failed while writing the reply"


class GenerationError(BotError):
    """The engine could not produce a reply.

    ``user_message`` is the one clause a chat user may see ("the model server
    is overloaded"): written for users, never built from exception text.
    ``detail`` is for the log only (exception reprs, CUDA messages, paths);
    ``str(exc)`` is both, for the log. The worker shows users ``user_message``
    and nothing else. ``retryable`` marks a passing fault (a model server
    refused the connection, answered 5xx, timed out or cut the stream): the
    worker tries the job again before it gives up."""

    def __init__(self, user_message: str, *, retryable: bool = False, detail: str = "") -> None:
        super().__init__(f"{user_message} ({detail})" if detail else user_message)
        self.user_message = user_message
        self.detail = detail
        self.retryable = retryable

    @classmethod
    def internal(cls, exc: BaseException, where: str) -> GenerationError:
        """A foreign exception from inside generation: the user gets
        :data:`MODEL_FAILED`, the log gets ``where`` and the exception's repr."""
        err = cls(MODEL_FAILED, detail=f"{where}: {exc!r}")
        err.__cause__ = exc  # the log's traceback shows where it came from
        return err


class StoreError(BotError):
    """The conversation store is unusable."""


class AdapterError(BotError):
    """An adapter could not start or lost its platform for good."""
