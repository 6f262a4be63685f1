"""The buttons under a finished Slack reply (issue 11), as Block Kit."""

from __future__ import annotations

from dataclasses import dataclass

from adapters.slack.api import JSON
from bot.types import ReplyInfo

#: Block action ids; each button's ``value`` carries the reply's row id, so a
#: click is understood with nothing in memory (after a restart too).
CONTINUE_ACTION = "xwin_continue"
REGENERATE_ACTION = "xwin_regenerate"
FEEDBACK_ACTION = "xwin_feedback"
#: Characters of text in one section block (Slack's limit is 3000).
SECTION_LIMIT = 3000


def final_blocks(text: str, info: ReplyInfo, *, native_feedback: bool = True) -> list[JSON]:
    """The blocks of a finished reply's last message: its mrkdwn ``text``, then
    the :func:`action_blocks`."""
    sections = [text[i : i + SECTION_LIMIT] for i in range(0, len(text), SECTION_LIMIT)] or [" "]
    blocks: list[JSON] = [{"type": "section", "text": {"type": "mrkdwn", "text": t}} for t in sections]
    return blocks + action_blocks(info, native_feedback=native_feedback)


def action_blocks(info: ReplyInfo, *, native_feedback: bool = True) -> list[JSON]:
    """Continue (only when cut at max_new_tokens) and Regenerate, then 👍/👎 as
    Slack's ``feedback_buttons`` (or plain buttons where those are refused)."""
    rid = str(info.reply_id)
    buttons = [_button("Regenerate", REGENERATE_ACTION, rid)]
    if info.can_continue:
        buttons.insert(0, {**_button("Continue", CONTINUE_ACTION, rid), "style": "primary"})
    if not native_feedback:
        votes = [{**_button("👍", FEEDBACK_ACTION, f"up:{rid}"), "action_id": f"{FEEDBACK_ACTION}_up"},
                 {**_button("👎", FEEDBACK_ACTION, f"down:{rid}"), "action_id": f"{FEEDBACK_ACTION}_down"}]
        return [{"type": "actions", "elements": buttons + votes}]
    return [
        {"type": "actions", "elements": buttons},
        {"type": "context_actions", "elements": [{
            "type": "feedback_buttons", "action_id": FEEDBACK_ACTION,
            "positive_button": {"text": _plain("👍"), "value": f"up:{rid}",
                                "accessibility_label": "Mark this reply as good"},
            "negative_button": {"text": _plain("👎"), "value": f"down:{rid}",
                                "accessibility_label": "Mark this reply as bad"},
        }]},
    ]


@dataclass
class BlockSupport:
    """What this workspace's Slack takes, shared by an adapter's sinks:
    ``feedback_buttons`` until Slack refuses them once (then plain buttons)."""

    native_feedback: bool = True


def _plain(text: str) -> JSON:
    return {"type": "plain_text", "text": text, "emoji": True}


def _button(label: str, action_id: str, value: str) -> JSON:
    return {"type": "button", "text": _plain(label), "action_id": action_id, "value": value}
