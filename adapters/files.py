"""Downloads of attached files, for the adapters: only from the platform's own
file servers, with a size cap and a timeout.

:class:`Downloader` is the :class:`~bot.attachments.FileFetcher` an adapter
hands to ``Bot.handle``. It fetches a URL only when its origin (scheme, host,
port) is one of ``origins`` (Slack: ``https://files.slack.com``; Discord:
``https://cdn.discordapp.com``, ``https://media.discordapp.net``), follows a
redirect only to one of them too, asks for the first bytes only when the
platform's metadata says the file is over the cap, stops reading one byte past
the cap whatever the server sends, and
gives up after ``timeout`` seconds. What went wrong is logged (host and status,
never the headers); the user gets one clause (:class:`FetchError`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import aiohttp
import yarl

from bot.attachments import NOT_FETCHED, FetchError
from bot.types import RemoteFile

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3
_CHUNK = 16384


def origin_of(url: str) -> str:
    try:
        parsed = yarl.URL(url)
        return str(parsed.origin()) if parsed.absolute and parsed.host else ""
    except (ValueError, TypeError):
        return ""


class Downloader:
    """``await fetch(file, max_bytes)``: at most ``max_bytes + 1`` bytes of the file."""

    def __init__(
        self,
        platform: str,
        origins: Sequence[str],
        *,
        timeout: float,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.platform = platform
        self.origins = frozenset(origin_of(o) for o in origins) - {""}
        self.timeout = timeout
        self._headers = dict(headers or {})

    def allowed(self, url: str) -> bool:
        return origin_of(url) in self.origins

    async def fetch(self, file: RemoteFile, max_bytes: int) -> bytes:
        if not file.url:  # deleted, or hidden by the platform
            raise FetchError(NOT_FETCHED)
        if not self.allowed(file.url):
            log.warning("%s: not downloading %r from %s: not one of the platform's file servers (%s)",
                        self.platform, file.name, origin_of(file.url) or "a bad URL", ", ".join(sorted(self.origins)))
            raise FetchError(f"I download files only from {self.platform}'s own servers")
        try:
            timeout = aiohttp.ClientTimeout(total=self.timeout)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                return await self._get(session, file, max_bytes)
        except FetchError:
            raise
        except TimeoutError:
            log.warning("%s: downloading %r took over %.0f s", self.platform, file.name, self.timeout)
        except (aiohttp.ClientError, OSError) as exc:
            log.warning("%s: downloading %r failed: %s", self.platform, file.name, type(exc).__name__)
        raise FetchError(NOT_FETCHED)

    async def _get(self, session: aiohttp.ClientSession, file: RemoteFile, max_bytes: int) -> bytes:
        url = yarl.URL(file.url)
        headers = dict(self._headers)
        if file.size > max_bytes:  # the metadata says it is too long: ask for its beginning only
            headers["Range"] = f"bytes=0-{max_bytes}"
        for _hop in range(MAX_REDIRECTS + 1):
            async with session.get(url, headers=headers, allow_redirects=False) as resp:
                if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                    url = url.join(yarl.URL(resp.headers["Location"]))
                    if not self.allowed(str(url)):
                        log.warning("%s: %r redirects to %s: not followed", self.platform, file.name, url.host)
                        raise FetchError(NOT_FETCHED)
                    continue
                self._check(resp, file)
                return await _read_at_most(resp, max_bytes + 1)
        log.warning("%s: %r redirects more than %d times", self.platform, file.name, MAX_REDIRECTS)
        raise FetchError(NOT_FETCHED)

    def _check(self, resp: aiohttp.ClientResponse, file: RemoteFile) -> None:
        if resp.status not in (200, 206):
            log.warning("%s: downloading %r answered HTTP %d", self.platform, file.name, resp.status)
            raise FetchError(NOT_FETCHED)
        # Slack answers a download it refuses (no files:read scope, a bad token)
        # with 200 and its sign-in page.
        if resp.content_type == "text/html" and "html" not in file.content_type:
            log.warning("%s: downloading %r gave a web page instead of the file: check the bot token "
                        "and its scopes (Slack: files:read)", self.platform, file.name)
            raise FetchError(NOT_FETCHED)


async def _read_at_most(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    data = bytearray()
    async for chunk in resp.content.iter_chunked(_CHUNK):
        data += chunk
        if len(data) >= limit:
            break
    return bytes(data[:limit])
