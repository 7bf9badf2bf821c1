"""The web page's files (api/ui/: plain ES modules, no build step), read once, and what the page is told about
this server (features, limits, whether it asks for an API key: never a key itself)."""

from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import msgspec

from contract.messages import VOICE_LANGUAGES
from infra.settings import Settings

UI_DIR = Path(__file__).resolve().parent / "ui"
INDEX = "index.html"
_MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}


@dataclass(frozen=True, slots=True)
class Asset:
    data: bytes
    media_type: str


@dataclass(frozen=True, slots=True)
class PageFiles:
    """The page's assets by path under api/ui/, and `version`: a digest of them all, the path segment assets are
    served under, so a browser may cache them forever and a new release is fetched at once."""

    template: str
    assets: dict[str, Asset]
    version: str


class PageConfig(msgspec.Struct, kw_only=True):
    """What the page reads at start (embedded in the HTML as JSON data, not script)."""

    keys: bool
    features: dict[str, bool]
    languages: list[str]
    image_max_bytes: int
    voice_max_ref_bytes: int
    voice_max_text_chars: int
    default_width: int
    default_height: int
    default_steps: int


@cache
def page_files() -> PageFiles:
    digest = hashlib.sha256()
    assets: dict[str, Asset] = {}
    for path in sorted(UI_DIR.rglob("*")):
        if not path.is_file():
            continue
        name = path.relative_to(UI_DIR).as_posix()
        data = path.read_bytes()
        digest.update(name.encode() + b"\0" + data + b"\0")
        media_type = _MEDIA_TYPES.get(path.suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"
        assets[name] = Asset(data, media_type)
    template = assets.pop(INDEX).data.decode()
    return PageFiles(template=template, assets=assets, version=digest.hexdigest()[:16])


def render_page(settings: Settings) -> str:
    """index.html with the asset version and this server's page configuration filled in."""
    files = page_files()
    config = PageConfig(
        keys=bool(settings.api_keys),
        features={
            "index": settings.image_search_enabled,
            "image": settings.image_enabled,
            "voice": settings.voice_enabled,
        },
        languages=list(VOICE_LANGUAGES),
        image_max_bytes=settings.image_search_max_bytes,
        voice_max_ref_bytes=settings.voice_max_ref_bytes,
        voice_max_text_chars=settings.voice_max_text_chars,
        default_width=settings.image_default_width,
        default_height=settings.image_default_height,
        default_steps=settings.image_default_steps,
    )
    # inside a <script type="application/json">: no "</" may end it early
    embedded = msgspec.json.encode(config).decode().replace("</", "<\\/")
    return files.template.replace("{{version}}", files.version).replace("{{config}}", embedded)
