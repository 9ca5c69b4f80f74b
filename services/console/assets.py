"""The console's static files as HTTP answers: content types, cache headers, a strict CSP, no listing, no
traversal. Pure: a request line in, an answer out, so every rule is tested without a socket."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

PREFIX = "/console/"
HEALTH_PATH = "/healthz"

# The console talks only to this origin's /api/v1 and loads only its own files: no inline code, no CDN.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; font-src 'self'; "
    "connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
)

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".txt": "text/plain; charset=utf-8",
}
# Vite names every file under assets/ after its content hash, so those never change; everything else
# (index.html above all) is revalidated so that a new build is picked up at once.
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"


@dataclass(frozen=True)
class Answer:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


def _text(status: int, text: str, *extra: tuple[str, str]) -> Answer:
    headers = (("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store"), *extra)
    return Answer(status, headers + SECURITY_HEADERS, text.encode())


def _safe_parts(relative: str) -> list[str] | None:
    """The path's segments, or None when it tries to leave the root or name something hidden."""
    if "\x00" in relative or "\\" in relative:
        return None
    parts = [p for p in relative.split("/") if p != ""]
    if any(p in (".", "..") or p.startswith(".") for p in parts):
        return None
    return parts


class ConsoleAssets:
    """Answers GET and HEAD for the built console under ``/console/`` from ``root`` (read per request, so a
    rebuild is served without a restart)."""

    def __init__(self, root: Path):
        self.root = root.resolve()

    def built(self) -> bool:
        return (self.root / "index.html").is_file()

    def answer(self, method: str, target: str, if_none_match: str | None = None) -> Answer:
        if method not in ("GET", "HEAD"):
            return _text(405, "method not allowed\n", ("Allow", "GET, HEAD"))
        path = urlsplit(target).path
        if path == HEALTH_PATH:
            return _text(200, "ok\n")
        if path == PREFIX.rstrip("/"):
            return _text(308, "moved\n", ("Location", PREFIX))
        if not path.startswith(PREFIX):
            return _text(404, "not found\n")
        parts = _safe_parts(unquote(path[len(PREFIX) :]))
        if parts is None:
            return _text(404, "not found\n")
        if not self.built():
            return _text(503, "the console is not built: run `make console` in the repository\n")
        file = self.root.joinpath(*parts) if parts else self.root / "index.html"
        resolved = file.resolve()
        if not resolved.is_relative_to(self.root) or not resolved.is_file():
            return _text(404, "not found\n")  # directories included: no listings
        return self._file(resolved, immutable=bool(parts) and parts[0] == "assets", if_none_match=if_none_match)

    def _file(self, file: Path, *, immutable: bool, if_none_match: str | None) -> Answer:
        stat = file.stat()
        etag = f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"'
        headers = (
            ("Content-Type", CONTENT_TYPES.get(file.suffix.lower(), "application/octet-stream")),
            ("Cache-Control", IMMUTABLE if immutable else REVALIDATE),
            ("ETag", etag),
        )
        if if_none_match is not None and etag in (t.strip() for t in if_none_match.split(",")):
            return Answer(304, headers + SECURITY_HEADERS, b"")
        return Answer(200, headers + SECURITY_HEADERS, file.read_bytes())
