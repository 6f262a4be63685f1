"""The Discord adapter: discord.py events in, :class:`~bot.types.Incoming` out, replies back.

- A mention in a text channel starts a conversation in a new thread made from the
  message (``reply_in = "thread"``) or as a reply in place (``"reply"``: the
  channel's running conversation). Messages in a bot thread continue it (with the
  message content intent; without it, when they mention the bot). Every DM
  continues the author's DM conversation.
- ``/xwin settings|set|reset|forget|delete|stop|continue|status`` through ``app_commands``; the
  option ranges and choices come from :data:`bot.settings.SPECS`. Replies are
  ephemeral, and the interaction is deferred first.
- Replies stream into one message edited about once a second, continue in new
  messages past 2000 characters without cutting a code block open, and are sent
  with ``AllowedMentions.none()``: model text can never ping anyone.

``api_base_url`` and ``gateway_url`` are honoured by pointing discord.py's two
process-wide endpoints (``Route.BASE``, ``DiscordWebSocket.DEFAULT_GATEWAY``) at
them while the adapter runs: one Discord adapter per process.
"""

from adapters.discord.adapter import FILE_ORIGINS, PLATFORM, DiscordAdapter
from adapters.discord.commands import XwinCommands
from adapters.discord.sink import NO_MENTIONS, DiscordSink, button_id, parse_button_id, reply_buttons
from adapters.discord.text import MESSAGE_LIMIT, queued_text, readable_text, split_message, thread_name

__all__ = [
    "FILE_ORIGINS", "MESSAGE_LIMIT", "NO_MENTIONS", "PLATFORM", "DiscordAdapter", "DiscordSink",
    "XwinCommands", "button_id", "parse_button_id", "queued_text", "readable_text", "reply_buttons",
    "split_message", "thread_name",
]
