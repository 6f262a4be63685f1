"""Every sentence an adapter shows a chat user, in one place.

The core's own sentences (busy, empty, stopped, a failed reply) are in
``bot/``; these are the adapters'. Platform markup (Slack's ``_italics_``) is
applied where a string is shown, not here.
"""

from __future__ import annotations

#: The one sentence a user gets when handling their event failed (the log has the detail).
SORRY = "Sorry, something went wrong on my side; please try again."
#: A command or message in a place the allowlists leave out.
NOT_HERE = "The bot is not enabled here."
#: The placeholder while the reply is being written.
THINKING = "thinking…"
#: The assistant panel's status line while the reply is being written.
PANEL_THINKING = "is thinking…"
#: A finished reply with no text.
EMPTY_REPLY = "(the model gave an empty reply)"
NO_REPLY = "(no reply)"


def queued(position: int) -> str:
    """The placeholder of a queued reply: ``position`` replies are ahead of it."""
    return "queued: next in line" if position <= 0 else f"queued: {position} ahead"


def panel_waiting(position: int) -> str:
    """The assistant panel's status line while queued."""
    return PANEL_THINKING if position <= 0 else f"is waiting: {position} ahead of you…"


def slack_queued(position: int) -> str:
    """Slack's placeholder of a queued reply (``_italics_`` added where shown)."""
    return "Thinking…" if position <= 0 else f"Queued: {position} ahead of you…"
#: ``/xwin continue`` in a Slack channel: Slack's slash commands do not say which thread they came from.
SLACK_CONTINUE_IN_THREAD = ("Slack does not tell me which thread a command comes from: press the Continue "
                            "button under the reply instead.")
