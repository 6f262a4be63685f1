"""Attached files served by the fake platforms, as their file servers do.

A :class:`FileHost` keeps files by path, answers ``GET`` with them (honouring a
``Range: bytes=0-N`` request with 206, as Discord's CDN and Slack's file server
do), and records every request with its headers, so tests can assert what was
fetched and with which ``Authorization``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from aiohttp import web

_RANGE = re.compile(r"bytes=0-(\d+)$")


@dataclass
class FileRequest:
    path: str
    headers: dict[str, str]


@dataclass
class FileHost:
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    requests: list[FileRequest] = field(default_factory=list)

    def add(self, path: str, data: bytes, content_type: str) -> None:
        self.files[path] = (data, content_type)

    def fetched(self, name: str) -> list[FileRequest]:
        """Requests for the file called ``name``."""
        return [r for r in self.requests if f"/{name}/" in r.path + "/"]

    async def serve(self, request: web.Request) -> web.Response:
        self.requests.append(FileRequest(request.path, dict(request.headers)))
        found = self.files.get(request.path)
        if found is None:
            return web.Response(status=404, text="not found")
        data, content_type = found
        wanted = _RANGE.match(request.headers.get("Range", ""))
        if wanted is not None and int(wanted.group(1)) + 1 < len(data):
            part = data[: int(wanted.group(1)) + 1]
            headers = {"Content-Range": f"bytes 0-{len(part) - 1}/{len(data)}", "Content-Type": content_type}
            return web.Response(body=part, status=206, headers=headers)
        return web.Response(body=data, headers={"Content-Type": content_type})
