"""The one reply renderer (adapters/render.py): one fence-aware splitter for
every platform, one compare-edit-post-delete loop."""

from __future__ import annotations

import pytest

from adapters import discord as discord_adapter
from adapters import slack_format
from adapters.render import ReplyMessages, split_message

SPLITTERS = {
    "discord": lambda text, limit: discord_adapter.split_message(text, limit),
    "slack": slack_format.split_message,
}


@pytest.mark.parametrize("platform", SPLITTERS)
@pytest.mark.parametrize("marker", ["```", "~~~"])
def test_each_platform_closes_and_reopens_a_cut_code_block(platform: str, marker: str) -> None:
    code = "\n".join(f"line_{i} = {i}" for i in range(60))
    text = f"Here:\n{marker}python\n{code}\n{marker}\nDone."
    chunks = SPLITTERS[platform](text, 300)
    assert len(chunks) > 2 and all(len(c) <= 300 for c in chunks)
    for chunk in chunks[1:-1]:
        assert chunk.startswith(f"{marker}python\n") and chunk.endswith(f"\n{marker}")
    assert chunks[0].endswith(f"\n{marker}") and chunks[-1].endswith("Done.")
    body = [line for c in chunks for line in c.split("\n") if line.startswith("line_")]
    assert body == code.split("\n")  # nothing lost, nothing doubled


@pytest.mark.parametrize("platform", SPLITTERS)
def test_a_code_line_longer_than_a_message_sends_no_empty_code_block(platform: str) -> None:
    line = "x" * 700
    chunks = SPLITTERS[platform](f"```json\n{line}\n```\nDone.", 300)
    assert all(len(c) <= 300 for c in chunks)
    assert "```json\n```" not in chunks  # a message with an empty code block in it
    body = "".join(x for c in chunks for x in c.split("\n") if x not in ("```json", "```"))
    assert body == line + "Done."  # nothing lost, nothing doubled


@pytest.mark.parametrize("platform", SPLITTERS)
def test_a_code_block_opened_at_a_messages_end_starts_the_next_message(platform: str) -> None:
    prose, code = "a" * 50, "b" * 40
    chunks = SPLITTERS[platform](f"{prose}\n```py\n{code}\n```", 70)
    assert chunks == [prose, f"```py\n{code}\n```"]  # not "aaa…\n```py\n```" first


def test_slack_never_cuts_an_entity_or_a_link() -> None:
    text = "&amp;" * 50 + " <https://example.com/a|a link> " * 10
    for chunk in slack_format.split_message(text, 97):
        assert len(chunk) <= 97
        assert chunk.count("<") == chunk.count(">")
        assert not chunk.rstrip().endswith(("&", "&a", "&am", "&amp"))


def test_blank_text_gives_no_message() -> None:
    assert split_message(" \n ", 100) == []


class Ops:
    """Records the platform calls; messages are numbered strings."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.next = 0
        self.refuse_posts = False

    async def post(self, text: str) -> str | None:
        if self.refuse_posts:
            return None
        self.next += 1
        self.calls.append(("post", text))
        return f"m{self.next}"

    async def edit(self, index: int, message: str, text: str, last: object) -> str | None:
        self.calls.append(("edit", f"{message}:{text}:{last}"))
        return message

    async def delete(self, message: str) -> None:
        self.calls.append(("delete", message))

    def id_of(self, message: str) -> str:
        return message


async def test_messages_compare_edit_post_delete_and_report_where_they_are() -> None:
    ops = Ops()
    placed: list[list[str]] = []

    async def on_placed(ids: list[str]) -> None:
        placed.append(ids)

    reply = ReplyMessages(ops, "test", placed=lambda: on_placed)
    assert await reply.show(["a", "b"])
    assert await reply.show(["a", "B", "c"])  # "a" unchanged: left alone
    assert await reply.show(["a"], last="buttons")  # the last one touched for its buttons
    assert ops.calls == [
        ("post", "a"), ("post", "b"),
        ("edit", "m2:B:None"), ("post", "c"),
        ("edit", "m1:a:buttons"), ("delete", "m3"), ("delete", "m2"),
    ]  # fmt: skip
    assert placed == [["m1", "m2"], ["m1", "m2", "m3"], ["m1"]]
    ops.refuse_posts = True
    assert not await reply.show(["a", "more"])  # a refused post is reported
    assert reply.shown == ["a"]
