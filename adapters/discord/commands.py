"""The ``/xwin`` command schema: each subcommand becomes the text after "/xwin"."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import discord
from discord import app_commands

from bot.settings import SPECS, SYSTEM_PROMPT_MAX

# Option bounds for the command schema (names in annotations, which discord.py
# evaluates in this module's namespace). top_p's lower bound is open: the core
# rejects 0; max_new_tokens' upper bound depends on the model's context and is
# checked by the core.
_TEMPERATURE_MIN, _TEMPERATURE_MAX = SPECS["temperature"].low, SPECS["temperature"].high
_TOP_P_MIN, _TOP_P_MAX = SPECS["top_p"].low, SPECS["top_p"].high
_TOP_K_MIN = SPECS["top_k"].low
_PENALTY_MIN, _PENALTY_MAX = SPECS["repetition_penalty"].low, SPECS["repetition_penalty"].high
_MAX_NEW_TOKENS_MIN = SPECS["max_new_tokens"].low


class XwinCommands(app_commands.Group):
    """``/xwin ...``: each subcommand is turned into the text after "/xwin" for
    :meth:`bot.app.Bot.command`."""

    def __init__(
        self,
        run: Callable[[discord.Interaction, str], Awaitable[None]],
        set_values: Callable[[discord.Interaction, dict[str, object]], Awaitable[None]],
        continue_last: Callable[[discord.Interaction], Awaitable[None]],
    ) -> None:
        super().__init__(name="xwin", description="Talk to the Xwin-LM bot: settings and conversation")
        self._run = run
        self._set_values = set_values
        self._continue_last = continue_last

    @app_commands.command(name="settings", description="Show the generation settings in force here")
    async def show_settings(self, interaction: discord.Interaction) -> None:
        await self._run(interaction, "settings")

    @app_commands.command(name="set", description="Change generation settings here (admins in a server)")
    @app_commands.describe(**{name: spec.help for name, spec in SPECS.items()})
    async def set_(
        self,
        interaction: discord.Interaction,
        temperature: app_commands.Range[float, _TEMPERATURE_MIN, _TEMPERATURE_MAX] | None = None,
        top_p: app_commands.Range[float, _TOP_P_MIN, _TOP_P_MAX] | None = None,
        top_k: app_commands.Range[int, _TOP_K_MIN] | None = None,
        repetition_penalty: app_commands.Range[float, _PENALTY_MIN, _PENALTY_MAX] | None = None,
        max_new_tokens: app_commands.Range[int, _MAX_NEW_TOKENS_MIN] | None = None,
        system_prompt: app_commands.Range[str, 1, SYSTEM_PROMPT_MAX] | None = None,
    ) -> None:
        given = {
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "repetition_penalty": repetition_penalty,
            "max_new_tokens": max_new_tokens,
            "system_prompt": system_prompt,
        }
        # Passed as values: text options are never read as command text (issue 9).
        # Discord itself checks each option's type and range before we see it.
        await self._set_values(interaction, {k: v for k, v in given.items() if v is not None})

    @app_commands.command(name="reset", description="Put settings back to the defaults")
    @app_commands.describe(name="one setting to reset (all when left out)")
    @app_commands.choices(name=[app_commands.Choice(name=n, value=n) for n in SPECS])
    async def reset(
        self, interaction: discord.Interaction, name: app_commands.Choice[str] | None = None
    ) -> None:
        await self._run(interaction, f"reset {name.value}" if name else "reset")

    @app_commands.command(name="forget", description="Start a new conversation here")
    async def forget(self, interaction: discord.Interaction) -> None:
        await self._run(interaction, "forget")

    @app_commands.command(name="delete", description="Erase this conversation's stored messages for good (admins)")
    @app_commands.describe(confirm="true erases; without it, says what would be erased")
    async def delete(self, interaction: discord.Interaction, confirm: bool = False) -> None:
        await self._run(interaction, "delete confirm" if confirm else "delete")

    @app_commands.command(name="stop", description="Cancel the reply being written here")
    async def stop(self, interaction: discord.Interaction) -> None:
        await self._run(interaction, "stop")

    @app_commands.command(name="continue", description="Go on with the newest reply here (one cut at its length)")
    async def continue_(self, interaction: discord.Interaction) -> None:
        await self._continue_last(interaction)

    @app_commands.command(name="status", description="Model, queue and speed")
    async def status(self, interaction: discord.Interaction) -> None:
        await self._run(interaction, "status")


