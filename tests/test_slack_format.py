"""Slack text both ways: Markdown → mrkdwn, escaping, splitting, markup → text."""

from __future__ import annotations

import re

import pytest

from adapters.slack_format import StreamSplitter, escape, readable_text, split_message, to_mrkdwn

NASTY = [
    "<!channel> <!here> <!everyone> <@U123> <#C1> <!subteam^S1>",
    "[click](https://x.com/>|<!here>) [me](javascript:alert(1)) [x](<!channel>)",
    "```\n<!channel>\n``` `<@U1>` **<!here>** [<!here>](https://ok.example)",
    "&lt;!channel&gt; &amp;lt;@U1&amp;gt; < > & ><!everyone",
    "<https://evil|<!here>> <mailto:a@b|<@U1>>",
]


def test_escape_the_three_characters() -> None:
    assert escape("a & b < c > d") == "a &amp; b &lt; c &gt; d"
    assert escape("&amp;") == "&amp;amp;"  # the model's text is text, not entities


@pytest.mark.parametrize("text", NASTY)
def test_model_text_never_makes_a_live_mention(text: str) -> None:
    out = to_mrkdwn(text)
    for seg in re.findall(r"<([^<>]*)>", out):
        assert seg.startswith(("http://", "https://", "mailto:")), (seg, out)
        assert "!" not in seg.split("|")[0] and "@U" not in seg
    for live in ("<!channel>", "<!here>", "<!everyone>", "<@U"):
        assert live not in out


def test_markdown_becomes_mrkdwn() -> None:
    src = "**bold** __also__ *it* ~~gone~~ [docs](https://x.io/a?b=1&c=2)\n# Title\n- one\n* two"
    assert to_mrkdwn(src) == (
        "*bold* *also* _it_ ~gone~ <https://x.io/a?b=1&amp;c=2|docs>\n*Title*\n• one\n• two"
    )


def test_code_survives_untouched_but_escaped() -> None:
    src = "see `**x** < y`:\n```python\nif a**2 < b and [l](https://z):\n    print('*hi*')\n```\n**after**"
    assert to_mrkdwn(src) == (
        "see `**x** &lt; y`:\n```python\nif a**2 &lt; b and [l](https://z):\n    print('*hi*')\n```\n*after*"
    )


def test_unclosed_code_block_while_streaming_stays_code() -> None:
    assert to_mrkdwn("text **b**\n```\n**not bold** <x>") == "text *b*\n```\n**not bold** &lt;x&gt;"


def test_arithmetic_stars_are_left_alone() -> None:
    assert to_mrkdwn("2 * 3 * 4 = 24") == "2 * 3 * 4 = 24"


def test_short_text_is_one_message() -> None:
    assert split_message("hello", 100) == ["hello"]


def test_split_keeps_every_message_under_the_limit_and_code_blocks_closed() -> None:
    prose = " ".join(f"word{i} &amp; <https://x.io/{i}|link{i}>" for i in range(300))
    code = "```\n" + "\n".join(f"line {i} &lt; {i + 1}" for i in range(400)) + "\n```"
    text = f"{prose}\n{code}\n{prose}"
    parts = split_message(text, 1000)
    assert len(parts) > 5
    for part in parts:
        assert len(part) <= 1000
        assert part.count("```") % 2 == 0
        assert not re.search(r"&[a-z]{0,3}$", part), part[-10:]  # no entity cut in two
        assert part.count("<") == part.count(">")  # no link cut in two
    joined = " ".join(parts)
    for i in (0, 150, 299):
        assert f"<https://x.io/{i}|link{i}>" in joined
    for i in (0, 200, 399):
        assert f"line {i} &lt; {i + 1}" in joined


def test_split_reopens_the_fence_with_its_language() -> None:
    code = "```python\n" + "\n".join(f"x = {i}" for i in range(300)) + "\n```"
    parts = split_message(code, 500)
    assert all(p.startswith("```python") for p in parts)
    assert all(p.endswith("```") for p in parts)


def test_split_cuts_a_very_long_line() -> None:
    parts = split_message("a" * 2500, 1000)
    assert all(len(p) <= 1000 for p in parts) and "".join(parts) == "a" * 2500


def test_readable_text_from_slack_markup() -> None:
    text = (
        "<@UBOT> hi <@U1>, see <#C1|general> and <#C2>: <https://x.io|the docs>, "
        "<https://y.io>, <mailto:a@b.c|a@b.c> <!here> <!subteam^S1|@devs> 1 &lt; 2 &amp;&amp; 3 &gt; 2"
    )
    out = readable_text(text, bot_user_id="UBOT", user_names={"U1": "aki"}, channel_names={"C2": "random"})
    assert out == (
        "hi @aki, see #general and #random: the docs (https://x.io), https://y.io, "
        "a@b.c @here @devs 1 < 2 && 3 > 2"
    )


def test_only_the_bots_mention_is_removed() -> None:
    out = readable_text("<@UBOT|xwin> ask <@U2> and <@UBOT>", bot_user_id="UBOT", user_names={})
    assert out == "ask @U2 and"


def test_empty_mention_is_empty_text() -> None:
    assert readable_text("  <@UBOT>  ", bot_user_id="UBOT", user_names={}) == ""


@pytest.mark.parametrize("seed", range(6))
def test_stream_splitter_messages_fit_keep_code_blocks_and_lose_nothing(seed: int) -> None:
    import random

    rng = random.Random(seed)
    para = "Lorem ipsum <dolor> sit & amet, consectetur adipiscing elit. " * 25
    code = "```python\n" + "\n".join(f"print({i} < {i + 1})" for i in range(120)) + "\n```"
    reply = "\n\n".join([para, code, para])
    splitter = StreamSplitter(900)
    messages = [""]
    for end in [*sorted(rng.sample(range(1, len(reply)), 25)), len(reply)]:
        first, *more = splitter.feed(reply[:end])  # a prefix of the reply, as it streams
        messages[-1] += first
        messages.extend(more)
    assert len(messages) >= 4
    assert all(len(escape(m)) <= 900 for m in messages)
    assert all(m.count("```") % 2 == 0 for m in messages)  # every cut code block closed and reopened
    # Without fences and blanks (added or dropped at cuts), the messages are the reply.
    strip = re.compile(r"```(?:python)?|\s")
    assert strip.sub("", "".join(messages)) == strip.sub("", reply)
    assert splitter.consumed == reply


def test_stream_splitter_never_takes_back_what_was_sent() -> None:
    splitter = StreamSplitter(1000)
    assert splitter.feed("Hello") == ["Hello"]
    assert splitter.feed("Hello, wor") == [", wor"]
    assert splitter.feed("Hello, world") == ["ld"]
    # A text that no longer extends what was sent goes on from where they agree.
    assert splitter.feed("Hello, world!\n\n(stopped)") == ["!\n\n(stopped)"]
