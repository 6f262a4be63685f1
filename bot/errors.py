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


class GenerationError(BotError):
    """The engine could not produce a reply.

    ``retryable`` marks a passing fault (a model server refused the connection,
    answered 5xx, timed out or cut the stream): the worker tries the job again
    before it gives up."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class StoreError(BotError):
    """The conversation store is unusable."""


class AdapterError(BotError):
    """An adapter could not start or lost its platform for good."""
