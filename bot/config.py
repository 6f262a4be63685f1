"""config.toml, loaded once at start-up into typed, frozen objects.

Unknown keys and bad values raise :class:`ConfigError` naming the key.
Secrets never live here: they come from the environment (see :class:`Secrets`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from bot.errors import ConfigError
from bot.settings import validate_settings
from bot.types import Settings

EMBEDDED_MODEL = "embedded"

PromptFormat = Literal["xwin", "chat_template"]
EngineKind = Literal["transformers", "openai", "fake"]


@dataclass(frozen=True)
class ModelConfig:
    id: str = "TheBloke/Xwin-LM-70B-V0.1-GPTQ"
    revision: str = "main"
    engine: EngineKind = "transformers"
    # "xwin" builds the Vicuna v1.1 prompt; "chat_template" uses the tokenizer's own.
    prompt_format: PromptFormat = "xwin"
    context_length: int = 4096
    device_map: str = "auto"
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    gptq_backend: Literal["auto", "marlin", "exllama_v2", "triton", "torch", "machete"] = "auto"
    # Concurrent replies decoded together by the one worker (1 = one at a time).
    max_batch: int = 1
    # "generate": one model.generate() per reply, as in the seed; "batched":
    # bot/engine/batched/, up to max_batch replies decoded together with a
    # static KV cache and CUDA graphs (the GPU path, see docs/benchmarks.md).
    decode: Literal["generate", "batched"] = "generate"
    # engine = "openai": an OpenAI-compatible server (vLLM, TGI, llama.cpp).
    base_url: str = ""
    served_model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    request_timeout: float = 120.0
    max_concurrency: int = 8
    api: Literal["completions", "chat"] = "completions"
    # Tokenizer to build prompts with for the openai engine ("" = same as id).
    tokenizer: str = ""
    # -- chunked prefill (issue 14, decode = "batched"): while other replies
    # are decoding, at most this many prompt tokens are prefilled at a time
    # (a longer prompt in chunks), with a decode step for the others between.
    # 1024 with mixed_prefill: 32 prompts of 1,005 tokens at once got their
    # median first token 0.8 s sooner than with 512, a decoding reply
    # waiting at most 0.27 s for a token (0.23 s with 512; docs/benchmarks.md).
    prefill_chunk: int = 1024
    # Those prompt tokens (from every waiting prompt, packed) go through one
    # forward together with the other replies' decode step, their tokens
    # riding on the prompts' read of the weights; false: each prompt's chunk
    # in a forward of its own, then a step.
    mixed_prefill: bool = True
    # Keep a finished reply's KV cache for the follow-up that starts with the same
    # tokens (decode = "batched"). Reuse is by exact token ids, so no other
    # conversation's text can enter a reply; but a reused prefix makes the first
    # token come sooner, which someone timing replies could notice (docs/privacy.md).
    prefix_cache: bool = True
    # Group size -1 GPTQ on a GPU (the reference checkpoint) with gptq_backend
    # = "marlin": fused products with the project's row-layout kernel for one
    # reply's steps and long prompts (bot/engine/products.py). false: Marlin
    # alone, every module regrouped (slower at one reply; an escape hatch).
    row_kernel: bool = True
    # With row_kernel, what multiplies decode steps of 2+ replies and prompts
    # under 256 tokens (docs/benchmarks.md has the timings): "marlin", fused
    # Marlin over a second copy of the weights (35 GB more for the 70B model),
    # fastest from 16 replies up; "mma", the project's tensor-core kernel on
    # the row packing, no second copy, within 2-7 % of Marlin up to 8 replies,
    # 14-18 % slower at 16-32, and past 32 rows a dequantize each step (slow);
    # "auto", marlin where the GPU holds the copy and the whole KV cache
    # (max_batch x context_length), else mma.
    batch_kernel: Literal["auto", "marlin", "mma"] = "auto"
    # With row_kernel, GPU memory still free after the weights, Marlin's copy
    # and the KV cache keeps some products' weights dequantized (half, 4x the
    # 4-bit bytes), so that long prompts skip unpacking them: one H200, the
    # unpacking is ~19 % of a 1,000-token prompt's products (docs/benchmarks.md).
    # Nothing is kept where nothing is free (an 80 GB card). false: none kept.
    dense_weights: bool = True
    # One reply's decode steps take their attention in the project's CUDA
    # kernels (bot/engine/attention.cu, built at the first start; faster than
    # torch's matmuls at one reply, docs/benchmarks.md), larger steps in
    # torch's. false: torch's for every step (if the start-up check refuses them).
    attention_kernel: bool = True
    # The compiled decode step's residual add + RMSNorm in the project's CUDA
    # kernel (bot/engine/norm.cu, built at the first start; the 70B step
    # 0.19 ms faster at one reply, 0.28 at 32, docs/benchmarks.md). false:
    # the compiled glue's (if the start-up check refuses the kernel).
    norm_kernel: bool = True
    # The project's CUDA kernels launched as programmatic dependent launches
    # on a Hopper GPU or later (bot/engine/cuda_ext.py): each decode-step
    # kernel starts while the one before it ends (the 70B one-reply step
    # 0.3 ms faster, docs/benchmarks.md). false: plain launches (if the
    # start-up check refuses them).
    dependent_launch: bool = True


@dataclass(frozen=True)
class GenerationConfig:
    temperature: float = 0.1
    top_p: float = 0.95
    top_k: int = 0
    repetition_penalty: float = 1.1
    max_new_tokens: int = 512
    system_prompt: str = (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )


@dataclass(frozen=True)
class BotConfig:
    database: str = "xwin-bot.sqlite3"
    max_queue: int = 64
    max_pending_per_user: int = 3
    # Messages older than this many days are purged for good (0 = keep forever).
    retention_days: int = 0
    # -- retention on a schedule (issue 12): seconds between purges while the
    # bot runs (the first purge is at start-up); used only when retention_days > 0.
    retention_interval: float = 3600.0
    # Seconds between streamed edits of a reply (platform rate limits).
    stream_interval: float = 1.0
    # Longest message read, in characters; longer ones are stored whole and cut with a notice.
    max_message_chars: int = 16000
    # A reply that fails on a passing fault (model server down, 5xx, cut stream)
    # is tried again this many times, after retry_delay seconds, doubling.
    retries: int = 2
    retry_delay: float = 2.0
    # -- buttons under replies (issue 11) --
    # Continue and Regenerate work on replies at most this many hours old.
    reply_buttons_max_age_hours: float = 24.0


@dataclass(frozen=True)
class DiscordConfig:
    enabled: bool = False
    reply_in: Literal["thread", "reply"] = "thread"
    guilds: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()
    admin_roles: tuple[str, ...] = ()
    allow_dms: bool = True
    command_guilds: tuple[str, ...] = ()
    # Access by role and user (issue 12): role ids or names; empty = everyone.
    # Roles are checked in servers; DMs follow allow_dms.
    allowed_roles: tuple[str, ...] = ()
    blocked_users: tuple[str, ...] = ()
    message_content_intent: bool = True
    api_base_url: str = "https://discord.com/api/v10"
    gateway_url: str = "wss://gateway.discord.gg"


@dataclass(frozen=True)
class SlackConfig:
    enabled: bool = False
    mode: Literal["socket", "http"] = "socket"
    http_host: str = "127.0.0.1"
    http_port: int = 3000
    teams: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()
    admin_users: tuple[str, ...] = ()
    allow_dms: bool = True
    # Access by user (issue 12): user ids; empty allowed_users = everyone.
    allowed_users: tuple[str, ...] = ()
    blocked_users: tuple[str, ...] = ()
    api_base_url: str = "https://slack.com/api/"
    # -- issue 10: the assistant panel ("Agents & AI Apps") and native streaming --
    # First message of a new panel thread (Markdown).
    assistant_greeting: str = "Hi! Ask me anything. Type `stop` to stop a reply, `settings` to see my settings."
    # Up to 4 buttons under the greeting: "Title | message sent" (or just the message).
    suggested_prompts: tuple[str, ...] = (
        "Explain something | Explain how public-key cryptography works, simply.",
        "Write code | Write a Python function that checks whether a string is a palindrome.",
        "Summarize text | Summarize the following text in three bullet points:",
    )
    # Stream replies with chat.startStream/appendStream/stopStream where Slack allows it
    # (panel threads); false = always placeholder + chat.update edits.
    native_streaming: bool = True


# [attachments] (issue 11): text files attached to a message are read into its turn.
@dataclass(frozen=True)
class AttachmentsConfig:
    enabled: bool = True
    # Bytes read per file at most; a longer file is cut there (and the reply says so).
    max_file_bytes: int = 65536
    # Files read per message; the rest are skipped (and the reply says so).
    max_files: int = 5
    # Share of the model's context that all files of one message may fill, (0, 1].
    context_share: float = 0.5
    # Seconds one download may take.
    download_timeout: float = 20.0


# -- issue 12: metrics and health, quotas --------------------------------------


@dataclass(frozen=True)
class MetricsConfig:
    """The /metrics, /healthz and /readyz HTTP endpoint (off by default)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9464


@dataclass(frozen=True)
class LimitsConfig:
    """Per-user quotas, counted in the store (0 = unlimited)."""

    messages_per_minute: int = 0
    # Tokens of the bot's replies per UTC day.
    tokens_per_day: int = 0


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    bot: BotConfig = field(default_factory=BotConfig)
    discord: DiscordConfig = field(default_factory=DiscordConfig)
    slack: SlackConfig = field(default_factory=SlackConfig)
    attachments: AttachmentsConfig = field(default_factory=AttachmentsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    # Folder that relative paths (the database) are taken from.
    base_dir: Path = field(default=Path("."), compare=False)

    def database_path(self) -> Path:
        path = Path(self.bot.database)
        return path if path.is_absolute() else self.base_dir / path


@dataclass(frozen=True)
class Secrets:
    """Tokens from the environment. ``repr`` never shows them."""

    discord_token: str = field(default="", repr=False)
    slack_bot_token: str = field(default="", repr=False)
    slack_app_token: str = field(default="", repr=False)
    slack_signing_secret: str = field(default="", repr=False)
    openai_api_key: str = field(default="", repr=False)

    @classmethod
    def from_env(cls, env: typing.Mapping[str, str] | None = None, api_key_env: str = "OPENAI_API_KEY") -> Secrets:
        env = os.environ if env is None else env
        return cls(
            discord_token=env.get("DISCORD_TOKEN", ""),
            slack_bot_token=env.get("SLACK_BOT_TOKEN", ""),
            slack_app_token=env.get("SLACK_APP_TOKEN", ""),
            slack_signing_secret=env.get("SLACK_SIGNING_SECRET", ""),
            openai_api_key=env.get(api_key_env, ""),
        )

    def all_values(self) -> list[str]:
        return [v for v in dataclasses.astuple(self) if v]


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "generation": GenerationConfig,
    "bot": BotConfig,
    "discord": DiscordConfig,
    "slack": SlackConfig,
    "attachments": AttachmentsConfig,
    "metrics": MetricsConfig,
    "limits": LimitsConfig,
}


def load_config(path: Path | str | None = None, *, model_override: str | None = None) -> Config:
    """Read and validate a config file (or the defaults when ``path`` is None)."""
    raw: dict[str, Any] = {}
    base_dir = Path(".")
    if path is not None:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        base_dir = path.resolve().parent
    return parse_config(raw, base_dir=base_dir, model_override=model_override)


def parse_config(
    raw: dict[str, Any], *, base_dir: Path = Path("."), model_override: str | None = None
) -> Config:
    for section in raw:
        if section not in _SECTIONS:
            raise ConfigError(f"unknown config section [{section}] (known: {', '.join(_SECTIONS)})")
    built: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        values = raw.get(section, {})
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table")
        built[section] = _build_section(section, cls, values)
    if model_override:
        built["model"] = _with_model(built["model"], model_override)
    if model_override == EMBEDDED_MODEL:
        built["generation"] = _embedded_generation(built["generation"])
    config = Config(**built, base_dir=base_dir)
    _check_cross_field(config)
    return config


# -- the embedded model's sampling (issue 12), chosen by measurement
# (bench/embedded_sampling.py, docs/benchmarks.md). With `--model embedded`
# these replace the seed's values, which suit Xwin-70B; a value the config
# file changed from the seed's is kept.
EMBEDDED_GENERATION: dict[str, Any] = {
    "temperature": 0.0,
    "repetition_penalty": 1.0,
    # SmolLM2's own (its chat template's default): with the Vicuna sentence it
    # answered "What is the capital of France?" in French.
    "system_prompt": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
}


def _embedded_generation(generation: GenerationConfig) -> GenerationConfig:
    seed = GenerationConfig()
    unchanged = {name: value for name, value in EMBEDDED_GENERATION.items()
                 if getattr(generation, name) == getattr(seed, name)}
    return dataclasses.replace(generation, **unchanged)


def _with_model(model: ModelConfig, model_id: str) -> ModelConfig:
    if model_id == EMBEDDED_MODEL:
        # The embedded model has its own chat template and a 8192-token window;
        # keep the operator's context setting only if it fits.
        return dataclasses.replace(
            model,
            id=model_id,
            engine="transformers",
            prompt_format="chat_template",
            context_length=min(model.context_length, 8192),
            device_map="cpu",
            gptq_backend="auto",
            decode="generate",
            max_batch=1,
        )
    return dataclasses.replace(model, id=model_id)


def _build_section(section: str, cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"[{section}] {key}: unknown key (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(f"[{section}] {key}", hints[key], value)
    return cls(**kwargs)


def _coerce(name: str, hint: Any, value: Any) -> Any:
    origin = get_origin(hint)
    if origin is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{name}: must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, (str, int)) for v in value):
            raise ConfigError(f"{name}: must be a list of strings, got {value!r}")
        return tuple(str(v) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: must be a number, got {value!r}")
        # TOML has nan and inf: neither is a delay, an interval or a temperature.
        if not math.isfinite(value):
            raise ConfigError(f"{name}: must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: must be a string, got {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported type {hint!r}")  # pragma: no cover - schema bug


def _check_cross_field(config: Config) -> None:
    m, g, b = config.model, config.generation, config.bot
    _positive("[model] context_length", m.context_length)
    _positive("[model] max_batch", m.max_batch)
    _positive("[model] prefill_chunk", m.prefill_chunk)  # issue 14
    _positive("[model] max_concurrency", m.max_concurrency)
    _positive("[bot] max_queue", b.max_queue)
    _positive("[bot] max_pending_per_user", b.max_pending_per_user)
    _positive("[bot] max_message_chars", b.max_message_chars)
    if b.retention_days < 0:
        raise ConfigError(f"[bot] retention_days: must be 0 or more, got {b.retention_days}")
    if b.retention_interval <= 0:
        raise ConfigError(f"[bot] retention_interval: must be more than 0, got {b.retention_interval}")
    if b.retries < 0 or b.retry_delay < 0:
        raise ConfigError("[bot] retries and retry_delay: must be 0 or more")
    if b.stream_interval < 0:
        raise ConfigError(f"[bot] stream_interval: must be 0 or more, got {b.stream_interval}")
    _check_ops(config)
    # Issue 9: values that used to end in a traceback at start-up.
    if not b.database.strip():
        raise ConfigError("[bot] database: must name a file, got an empty string")
    if not 0 <= config.slack.http_port <= 65535:
        raise ConfigError(f"[slack] http_port: must be 0 to 65535, got {config.slack.http_port}")
    if b.reply_buttons_max_age_hours <= 0:  # issue 11
        raise ConfigError(
            f"[bot] reply_buttons_max_age_hours: must be more than 0, got {b.reply_buttons_max_age_hours}"
        )
    if m.engine == "openai" and not m.base_url:
        raise ConfigError("[model] base_url: required when engine = \"openai\"")
    _check_slack(config.slack)
    if m.request_timeout <= 0:
        raise ConfigError(f"[model] request_timeout: must be more than 0, got {m.request_timeout}")
    _check_attachments(config.attachments)
    # Generation defaults obey the same ranges as /xwin set.
    try:
        validate_settings(settings_from_generation(g), context_length=m.context_length)
    except ValueError as exc:
        raise ConfigError(f"[generation] {exc}") from None


def _check_attachments(a: AttachmentsConfig) -> None:
    _positive("[attachments] max_file_bytes", a.max_file_bytes)
    _positive("[attachments] max_files", a.max_files)
    if not 0 < a.context_share <= 1:
        raise ConfigError(f"[attachments] context_share: must be in (0, 1], got {a.context_share}")
    if a.download_timeout <= 0:
        raise ConfigError(f"[attachments] download_timeout: must be more than 0, got {a.download_timeout}")


def _check_slack(s: SlackConfig) -> None:
    """issue 10: Slack shows at most 4 suggested prompts, each with a title and a message."""
    if len(s.suggested_prompts) > 4:
        raise ConfigError(f"[slack] suggested_prompts: at most 4, got {len(s.suggested_prompts)}")
    for prompt in s.suggested_prompts:
        title, _, message = prompt.partition("|")
        if not title.strip() or ("|" in prompt and not message.strip()):
            raise ConfigError(f"[slack] suggested_prompts: {prompt!r} must be \"Title | message\" or a message")
def _check_ops(config: Config) -> None:
    """[metrics] and [limits] (issue 12)."""
    if not 0 <= config.metrics.port <= 65535:
        raise ConfigError(f"[metrics] port: must be 0 to 65535, got {config.metrics.port}")
    for name in ("messages_per_minute", "tokens_per_day"):
        if getattr(config.limits, name) < 0:
            raise ConfigError(f"[limits] {name}: must be 0 (unlimited) or more, got {getattr(config.limits, name)}")


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{name}: must be 1 or more, got {value}")


def settings_from_generation(g: GenerationConfig) -> Settings:
    return Settings(
        temperature=g.temperature,
        top_p=g.top_p,
        top_k=g.top_k,
        repetition_penalty=g.repetition_penalty,
        max_new_tokens=g.max_new_tokens,
        system_prompt=g.system_prompt,
    )
