from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from bot.config import EMBEDDED_GENERATION, Config, GenerationConfig, Secrets, load_config
from bot.errors import ConfigError
from bot.main import RedactSecrets

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_shipped_config_is_the_real_deployment() -> None:
    config = load_config(ROOT / "config.toml")
    assert config.model.id == "TheBloke/Xwin-LM-70B-V0.1-GPTQ"
    assert config.model.prompt_format == "xwin" and config.model.context_length == 4096
    assert config.model.gptq_backend == "marlin" and config.model.row_kernel  # issue 14's fast path
    g = config.generation
    # The seed article's sampling settings.
    assert (g.temperature, g.top_p, g.repetition_penalty) == (0.1, 0.95, 1.1)
    assert config.database_path() == ROOT / "xwin-bot.sqlite3"


def test_model_override_and_embedded() -> None:
    config = load_config(ROOT / "config.toml", model_override="embedded")
    assert config.model.id == "embedded" and config.model.prompt_format == "chat_template"
    assert config.model.decode == "generate" and config.model.device_map == "cpu"
    other = load_config(ROOT / "config.toml", model_override="/models/xwin-7b")
    assert other.model.id == "/models/xwin-7b" and other.model.prompt_format == "xwin"
    assert other.generation == load_config(ROOT / "config.toml").generation


def test_embedded_sampling_defaults_replace_only_the_seeds_values(tmp_path: Path) -> None:
    shipped = load_config(ROOT / "config.toml", model_override="embedded").generation
    for name, value in EMBEDDED_GENERATION.items():
        assert getattr(shipped, name) == value != getattr(GenerationConfig(), name)
    assert shipped.max_new_tokens == GenerationConfig().max_new_tokens
    mine = write(tmp_path, '[generation]\ntemperature = 0.7\nsystem_prompt = "Be terse."\n')
    chosen = load_config(mine, model_override="embedded").generation
    assert (chosen.temperature, chosen.system_prompt) == (0.7, "Be terse.")
    assert chosen.repetition_penalty == EMBEDDED_GENERATION["repetition_penalty"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("[model]\nidd = 'x'\n", r"\[model\] idd: unknown key"),
        ("[modle]\nid = 'x'\n", r"unknown config section \[modle\]"),
        ("[generation]\ntemperature = 'hot'\n", r"\[generation\] temperature: must be a number"),
        ("[generation]\ntemperature = 3.0\n", r"\[generation\] temperature must be a number in \[0, 2\]"),
        ("[generation]\nmax_new_tokens = 5000\n", r"\[generation\] max_new_tokens must be an integer in \[1, 4095\]"),
        ("[model]\nprompt_format = 'alpaca'\n", r"\[model\] prompt_format: must be one of 'xwin', 'chat_template'"),
        ("[bot]\nmax_queue = 0\n", r"\[bot\] max_queue: must be 1 or more"),
        ("[discord]\nenabled = 'yes'\n", r"\[discord\] enabled: must be true or false"),
        ("[model]\nrow_kernel = 'off'\n", r"\[model\] row_kernel: must be true or false"),
        ("[slack]\nadmin_users = 'U1'\n", r"\[slack\] admin_users: must be a list of strings"),
        ("[model]\nengine = 'openai'\n", r"\[model\] base_url: required"),
        ("[slack]\nsuggested_prompts = ['a', 'b', 'c', 'd', 'e']\n", r"\[slack\] suggested_prompts: at most 4"),
        ("[slack]\nsuggested_prompts = ['Title |']\n", r"\[slack\] suggested_prompts: 'Title \|' must be"),
        ("[model\nid = 1", r"not valid TOML"),
        # issue 9: nan and inf are not numbers a bot can wait, stream or sample with
        ("[bot]\nretry_delay = nan\n", r"\[bot\] retry_delay: must be a finite number, got nan"),
        ("[bot]\nstream_interval = nan\n", r"\[bot\] stream_interval: must be a finite number"),
        ("[model]\nrequest_timeout = inf\n", r"\[model\] request_timeout: must be a finite number"),
        ("[generation]\ntemperature = -nan\n", r"\[generation\] temperature: must be a finite number"),
        ("[slack]\nhttp_port = 70000\n", r"\[slack\] http_port: must be 0 to 65535, got 70000"),
        ("[bot]\ndatabase = ''\n", r"\[bot\] database: must name a file"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(AttributeError):
        config.model.id = "x"  # type: ignore[misc]


def test_cli_stops_with_one_clear_line_on_bad_config(tmp_path: Path) -> None:
    path = write(tmp_path, "[bot]\nmax_queue = -1\n")
    done = subprocess.run([sys.executable, "-m", "bot.main", "chat", "--config", str(path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.strip() == "xwin-bot: config error: [bot] max_queue: must be 1 or more, got -1"


def test_secrets_come_from_the_environment_and_never_reach_a_log(caplog: pytest.LogCaptureFixture) -> None:
    secrets = Secrets.from_env({"DISCORD_TOKEN": "MTIz.discord-secret", "SLACK_BOT_TOKEN": "xoxb-slack-secret"})
    assert "secret" not in repr(secrets)
    log = logging.getLogger("test.redact")
    log.addFilter(RedactSecrets(secrets.all_values()))
    with caplog.at_level(logging.INFO, logger="test.redact"):
        log.info("connecting with %s and %s", secrets.discord_token, secrets.slack_bot_token)
        try:
            raise RuntimeError(f"401 for token {secrets.slack_bot_token}")
        except RuntimeError:
            log.exception("login failed")
    text = caplog.text
    assert "discord-secret" not in text and "slack-secret" not in text
    assert "connecting with *** and ***" in text and "traceback withheld" in text


@pytest.mark.parametrize("trouble", ["newer-schema", "not-sqlite", "held"])
def test_a_store_that_cannot_be_opened_ends_the_process_with_one_sentence(tmp_path: Path, trouble: str) -> None:
    import sqlite3

    from bot.store import MIGRATIONS, _ProcessLock

    db = tmp_path / "bot.sqlite3"
    path = write(tmp_path, f"[model]\nengine = 'fake'\n[bot]\ndatabase = '{db}'\n")
    lock = _ProcessLock(db)
    if trouble == "newer-schema":
        with sqlite3.connect(db) as raw:
            raw.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    elif trouble == "not-sqlite":
        db.write_bytes(b"x")
    else:
        lock.acquire()  # as a running bot holds it
    try:
        done = subprocess.run([sys.executable, "-m", "bot.main", "run", "--config", str(path)],
                              capture_output=True, text=True, timeout=60, cwd=ROOT)
    finally:
        lock.release()
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert {"newer-schema": "newer than this bot knows", "not-sqlite": "not an SQLite database",
            "held": "another xwin-bot process"}[trouble] in lines[0]
