"""The Slack adapter: slack-bolt's ``AsyncApp`` in front of the platform-free core.

Socket Mode by default (no public URL), HTTP mode as an option (bolt checks
each request's signature). It turns ``app_mention`` events, follow-ups in the
bot's threads and DMs into :class:`~bot.types.Incoming`, answers through
:class:`SlackReplySink` (a placeholder with the queue position, then
``chat.update`` about once a second, continued in new thread messages past
Slack's limit), and maps the ``/xwin`` slash command onto ``Bot.command``.

The assistant panel ("Agents & AI Apps") goes through slack-bolt's
``AsyncAssistant`` middleware: a new panel thread is greeted and given
suggested prompts, each panel thread is its own conversation, its title is
the first question, and replies there go through :class:`PanelReplySink`
(the thread's status line while waiting, then native streaming with
``chat.startStream``/``appendStream``/``stopStream``, or edits where Slack
refuses streams). The panel has no slash commands: a message that is exactly
``stop``, ``continue``, ``settings``, ``status``, ``forget`` or ``help``, or
that starts with ``/xwin``, runs that command there.

Usage (``bot.main``)::

    slack = SlackAdapter(bot, config.slack, Secrets.from_env())
    await slack.start()      # AdapterError with one sentence on a bad token/scope
    ...
    await slack.close()
"""

from adapters.slack.adapter import DM_SCOPE, FILE_ORIGINS, OPTIONAL_SCOPES, REQUIRED_SCOPES, SlackAdapter
from adapters.slack.blocks import (
    CONTINUE_ACTION,
    FEEDBACK_ACTION,
    REGENERATE_ACTION,
    BlockSupport,
    action_blocks,
    final_blocks,
)
from adapters.slack.events import PANEL_COMMANDS, panel_command
from adapters.slack.sink import MESSAGE_LIMIT, PanelReplySink, SlackReplySink, StreamSupport

__all__ = [
    "CONTINUE_ACTION", "DM_SCOPE", "FEEDBACK_ACTION", "FILE_ORIGINS", "MESSAGE_LIMIT", "OPTIONAL_SCOPES",
    "PANEL_COMMANDS", "REGENERATE_ACTION", "REQUIRED_SCOPES", "BlockSupport", "PanelReplySink",
    "SlackAdapter", "SlackReplySink", "StreamSupport", "action_blocks", "final_blocks", "panel_command",
]
