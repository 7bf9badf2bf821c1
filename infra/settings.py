"""Settings read once from the environment.

Every variable of the seed server keeps its name and default; the new ones are documented in README.md.
A bad value raises SettingsError with one line that names the variable and says what is expected.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

ModelProfile = Literal["full", "tiny"]
LogFormat = Literal["json", "console"]

DEFAULT_CLIP_MODEL = "ViT-B-16-SigLIP2-256"
DEFAULT_CLIP_PRETRAINED = "webli"
DEFAULT_IMAGE_MODEL = "Tongyi-MAI/Z-Image-Turbo"
DEFAULT_VOICE_MODEL = "Qwen/Qwen3-TTS-12Hz-0.6B-Base"
TORCH_DTYPES = ("auto", "float32", "float16", "bfloat16")

# generation defaults per model profile: (width, height, steps, guidance scale)
_GENERATION_DEFAULTS = {"full": (1024, 1024, 9, 0.0), "tiny": (64, 64, 2, 5.0)}
# the most width x height x steps one image may cost (IMAGE_MAX_PIXEL_STEPS): a generation's time grows with it
_PIXEL_STEP_BUDGETS = {"full": 1024 * 1024 * 30, "tiny": 512 * 512 * 4}


class SettingsError(ValueError):
    """A variable holds a value the server cannot start with."""


ACCESS_LEVELS = ("read", "write", "admin")  # each includes the ones before it
MIN_API_KEY_CHARS = 16
MIN_SIGNING_KEY_CHARS = 32  # a signed link's HMAC can be guessed at offline: a key of at least 128 bits as hex


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One API key: its access level, the SHA-256 of the key (never the key itself) and a name for logs."""

    level: str
    digest: bytes
    name: str


@dataclass(frozen=True, slots=True)
class Settings:
    # feature toggles
    image_enabled: bool
    image_search_enabled: bool
    voice_enabled: bool
    r2_enabled: bool
    # image search
    image_search_db_path: Path
    image_search_files_dir: Path
    image_search_max_elements: int
    image_search_max_bytes: int
    image_search_max_pixels: int
    image_search_batch_size: int
    image_decode_threads: int
    thumbnail_max_side: int
    thumbnails_at_index: bool
    image_search_db_r2_key: str
    image_search_db_backup_enabled: bool
    image_search_db_backup_interval_seconds: int
    image_search_db_backup_generations: int
    image_search_index_build_points: int
    # R2 / S3
    r2_account_id: str
    r2_endpoint_url: str
    r2_access_key_id: str
    r2_secret_access_key: str
    r2_bucket_name: str
    r2_region: str
    r2_timeout_seconds: float
    r2_max_connections: int
    # embedded object store and presigned URLs
    local_storage_dir: Path
    presign_ttl_seconds: int
    public_base_url: str
    url_signing_key: str
    # broker and vectors
    amqp_url: str
    amqp_connect_timeout_seconds: float
    max_attempts: int
    max_interrupted_runs: int
    qdrant_url: str
    qdrant_api_key: str
    qdrant_collection: str
    # models
    model_profile: ModelProfile
    model_cache_dir: Path
    clip_model: str
    clip_pretrained: str
    torch_device: str
    image_model: str
    image_dtype: str
    clip_dtype: str
    voice_dtype: str
    image_default_width: int
    image_default_height: int
    image_default_steps: int
    image_default_guidance: float
    image_max_pixel_steps: int
    voice_model: str
    voice_max_ref_bytes: int
    voice_max_ref_seconds: float
    voice_min_ref_seconds: float
    voice_max_text_chars: int
    voice_chunk_chars: int
    voice_ref_prefix: str
    voice_mp3_bitrate_kbps: int
    # upstream messages and bucket events
    watch_prefixes: tuple[str, ...]
    processor_metrics_port: int
    processor_capabilities: tuple[str, ...]
    job_record_ttl_days: int
    output_ttl_days: float | None  # None: generated outputs are kept
    job_events_enabled: bool
    # HTTP callbacks (contract/callbacks.py)
    callback_hosts: tuple[str, ...]
    callback_secrets: tuple[bytes, ...]
    callback_timeout_seconds: float
    callback_allow_private_addresses: bool
    # HTTP server and jobs
    host: str
    port: int
    http_max_request_line_bytes: int
    http_max_headers: int
    http_max_header_bytes: int
    http_read_timeout_seconds: float
    http_keepalive_seconds: int
    rate_limit_per_minute: int
    cors_origins: tuple[str, ...]
    allowed_hosts: tuple[str, ...]
    sync_timeout_seconds: float
    log_level: str
    log_format: LogFormat
    api_keys: tuple[ApiKey, ...] = ()

    def capability_enabled(self, capability: str) -> bool:
        """Whether the feature behind a processor capability (CAPABILITY_FLAGS) is switched on."""
        return {
            "index": self.image_search_enabled,
            "image": self.image_enabled,
            "voice": self.voice_enabled,
            "callback": bool(self.callback_hosts),
        }[capability]

    @property
    def embedded_qdrant(self) -> bool:
        """True when vectors live in the embedded engine (one owning process per directory)."""
        return not self.qdrant_url

    @property
    def r2_effective_endpoint(self) -> str:
        if self.r2_endpoint_url:
            return self.r2_endpoint_url
        return f"https://{self.r2_account_id}.r2.cloudflarestorage.com"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        return _parse(_Reader(os.environ if environ is None else environ))


@dataclass(frozen=True, slots=True)
class Variable:
    """How the settings read one variable: its default as text ("" when unset means something else, or when it is
    computed), the least and most a number may be, the values a choice may take."""

    default: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()


class _Reader:
    def __init__(self, environ: Mapping[str, str]) -> None:
        self._env = environ
        self.variables: dict[str, Variable] = {}

    def raw(self, name: str, default: str) -> str:
        self.variables.setdefault(name, Variable(default))
        value = self._env.get(name)
        return default if value is None else value.strip()

    def _bounded(self, name: str, minimum: float, maximum: float | None) -> None:
        self.variables[name] = dataclasses.replace(self.variables[name], minimum=minimum, maximum=maximum)

    def flag(self, name: str, default: bool) -> bool:
        value = self.raw(name, "1" if default else "0").lower()
        if value in {"1", "true", "yes", "on"}:
            return True
        if value in {"0", "false", "no", "off"}:
            return False
        raise SettingsError(f"{name}={value!r}: expected 1 or 0 (true/false, yes/no, on/off also work)")

    def integer(self, name: str, default: int, minimum: int, maximum: int | None = None) -> int:
        value = self.raw(name, str(default))
        self._bounded(name, minimum, maximum)
        try:
            number = int(value)
        except ValueError:
            raise SettingsError(f"{name}={value!r}: expected a whole number") from None
        if number < minimum or (maximum is not None and number > maximum):
            upper = "" if maximum is None else f" and at most {maximum}"
            raise SettingsError(f"{name}={number}: must be at least {minimum}{upper}")
        return number

    def number(self, name: str, default: float, minimum: float, maximum: float | None = None) -> float:
        value = self.raw(name, str(default))
        self._bounded(name, minimum, maximum)
        try:
            number = float(value)
        except ValueError:
            raise SettingsError(f"{name}={value!r}: expected a number") from None
        if not number >= minimum or (maximum is not None and number > maximum):
            upper = "" if maximum is None else f" and at most {maximum}"
            raise SettingsError(f"{name}={value}: must be at least {minimum}{upper}")
        return number

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw(name, default).lower()
        self.variables[name] = dataclasses.replace(self.variables[name], choices=choices)
        if value not in choices:
            raise SettingsError(f"{name}={value!r}: expected one of {', '.join(choices)}")
        return value

    def url(self, name: str, default: str, schemes: tuple[str, ...]) -> str:
        value = self.raw(name, default)
        if not value:
            return value
        parsed = urlparse(value)
        if parsed.scheme not in schemes or not parsed.hostname:
            raise SettingsError(f"{name}={value!r}: expected a URL starting with {' or '.join(schemes)}://")
        try:
            port = parsed.port
        except ValueError:  # not a number, or past 65535
            port = 0
        if port == 0:
            given = parsed.netloc.rpartition("@")[2].rpartition(":")[2]  # not the whole URL: it may hold a password
            raise SettingsError(f"{name}: expected a port from 1 to 65535 after the host, not {given!r}")
        return value.rstrip("/")

    def key(self, name: str, default: str) -> str:
        """An object key, as every store takes it (infra/storage/keys.py)."""
        from infra.storage.keys import validate_key  # here: infra.storage imports these settings

        value = self.raw(name, default)
        try:
            return validate_key(value)
        except ValueError as exc:
            raise SettingsError(f"{name}={value!r}: expected an object key like {default!r} ({exc})") from None


def _prefix(env: _Reader, name: str, default: str) -> str:
    value = env.raw(name, default)
    if not value or value.startswith("/") or ".." in value.split("/") or not value.endswith("/"):
        raise SettingsError(f"{name}={value!r}: expected a key prefix like 'voice/refs/' (no leading '/', no '..')")
    return value


def _prefixes(env: _Reader, name: str, default: str) -> tuple[str, ...]:
    value = env.raw(name, default)
    items = tuple(item.strip() for item in value.split(",") if item.strip())
    bad = [item for item in items if item.startswith("/") or ".." in item.split("/")]
    if not items or bad:
        raise SettingsError(
            f"{name}={value!r}: expected comma-separated key prefixes like 'images/incoming/' (no leading '/', no '..')"
        )
    return items


def _list(env: _Reader, name: str) -> tuple[str, ...]:
    """A comma-separated list; empty when unset."""
    return tuple(item.strip() for item in env.raw(name, "").split(",") if item.strip())


CALLBACK_SECRET_PREFIX = "whsec_"
CALLBACK_SECRET_BYTES = (24, 64)  # what Standard Webhooks asks of a signing secret
# a host name as CALLBACK_HOSTS and callback URLs may name it (lowercase; `_` allowed, as in compose service names)
_HOST_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")


def _callback_hosts(env: _Reader) -> tuple[str, ...]:
    """CALLBACK_HOSTS: where callbacks may go, comma-separated: `host` (any port), `host:port`, `*.domain` (any host
    under it, not the domain itself), `[v6 address]:port`; lowercased."""
    hosts = []
    for entry in _list(env, "CALLBACK_HOSTS"):
        wildcard = entry.startswith("*.")
        parsed = urlparse(f"//{entry.lower().removeprefix('*.')}")
        try:
            port = parsed.port
        except ValueError:
            port = None
            parsed = urlparse("//:")
        host = parsed.hostname or ""
        if not is_host(host) or parsed.path or parsed.username is not None or (wildcard and is_address(host)):
            raise SettingsError(
                f"CALLBACK_HOSTS entry {entry!r}: expected host, host:port, *.domain or [v6 address]:port, "
                "comma-separated (e.g. hooks.example.com,*.internal.example:8443)"
            )
        shown = f"[{host}]" if ":" in host else host
        hosts.append(("*." if wildcard else "") + shown + (f":{port}" if port is not None else ""))
    return tuple(dict.fromkeys(hosts))


def is_address(host: str) -> bool:
    """Whether `host` is an IP address (IPv6 without brackets)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_host(host: str) -> bool:
    """Whether `host` (lowercase) is a host name or an IP address."""
    return bool(_HOST_NAME.match(host)) or is_address(host)


def _callback_secrets(env: _Reader) -> tuple[bytes, ...]:
    """CALLBACK_SECRET: the key(s) callbacks are signed with (Standard Webhooks: whsec_ and base64), comma-separated
    while a key is rotated (each signs; a receiver checking either accepts)."""
    secrets = []
    low, high = CALLBACK_SECRET_BYTES
    for position, entry in enumerate(_list(env, "CALLBACK_SECRET"), start=1):
        try:
            key = base64.b64decode(entry.removeprefix(CALLBACK_SECRET_PREFIX), validate=True)
        except binascii.Error:
            key = b""
        if not entry.startswith(CALLBACK_SECRET_PREFIX) or not low <= len(key) <= high:
            raise SettingsError(
                f"CALLBACK_SECRET entry {position}: expected {CALLBACK_SECRET_PREFIX} followed by {low} to {high} "
                f"random bytes in base64; make one with: "
                f"echo {CALLBACK_SECRET_PREFIX}$(head -c 32 /dev/urandom | base64)"
            )
        secrets.append(key)
    return tuple(secrets)


def _url_signing_key(env: _Reader) -> str:
    """URL_SIGNING_KEY: unset (a random key kept in the local store), or one long enough not to be guessed."""
    key = env.raw("URL_SIGNING_KEY", "")
    if key and len(key) < MIN_SIGNING_KEY_CHARS:
        raise SettingsError(
            f"URL_SIGNING_KEY: expected at least {MIN_SIGNING_KEY_CHARS} characters (e.g. $(openssl rand -hex 32)), "
            f"not {len(key)}; unset, a random key is kept in LOCAL_STORAGE_DIR/signing.key"
        )
    return key


def _api_keys(env: _Reader) -> tuple[ApiKey, ...]:
    """API_KEYS (`level:key`, comma-separated) and API_KEYS_FILE (lines `level sha256:<hex> [name]`)."""
    keys: list[ApiKey] = []
    for position, entry in enumerate(filter(None, (item.strip() for item in env.raw("API_KEYS", "").split(",")))):
        level, _, key = entry.partition(":")
        if level not in ACCESS_LEVELS or len(key) < MIN_API_KEY_CHARS:
            raise SettingsError(
                f"API_KEYS entry {position + 1}: expected level:key with a level of {', '.join(ACCESS_LEVELS)} "
                f"and a key of at least {MIN_API_KEY_CHARS} characters (e.g. write:$(openssl rand -hex 24))"
            )
        keys.append(ApiKey(level, hashlib.sha256(key.encode()).digest(), f"API_KEYS[{position + 1}]"))
    path = env.raw("API_KEYS_FILE", "")
    if path:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise SettingsError(f"API_KEYS_FILE={path!r}: cannot read it ({exc.strerror})") from None
        for number, line in enumerate(lines, 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            digest = fields[1].removeprefix("sha256:") if len(fields) >= 2 else ""
            if fields[0] not in ACCESS_LEVELS or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
                raise SettingsError(
                    f"API_KEYS_FILE={path!r} line {number}: expected 'level sha256:<64 hex digits> [name]' with a "
                    f"level of {', '.join(ACCESS_LEVELS)}; hash a key with: printf %s KEY | sha256sum"
                )
            name = " ".join(fields[2:]) or f"{Path(path).name}:{number}"
            keys.append(ApiKey(fields[0], bytes.fromhex(digest), name))
    return tuple(keys)


# capability (a queue of its own, see infra/broker.py) -> the variable that switches it on
CAPABILITY_FLAGS = {
    "index": "IMAGE_SEARCH_ENABLED",
    "image": "IMAGE_ENABLED",
    "voice": "VOICE_ENABLED",
    "callback": "CALLBACK_HOSTS",
}


def capability_off(capability: str) -> str:
    """How the settings switch a capability off, as an error names it."""
    flag = CAPABILITY_FLAGS[capability]
    return f"{flag} is empty" if capability == "callback" else f"{flag}=0"


def _capabilities(env: _Reader, settings: Settings) -> tuple[str, ...]:
    """PROCESSOR_CAPABILITIES: the queues a processor consumes; default, every capability whose feature is on."""
    value = env.raw("PROCESSOR_CAPABILITIES", "")
    if not value.strip():
        return tuple(name for name in CAPABILITY_FLAGS if settings.capability_enabled(name))
    items = tuple(dict.fromkeys(item.strip().lower() for item in value.split(",") if item.strip()))
    unknown = [item for item in items if item not in CAPABILITY_FLAGS]
    if unknown:
        raise SettingsError(
            f"PROCESSOR_CAPABILITIES={value!r}: unknown {', '.join(unknown)}; use a comma-separated subset of "
            f"{', '.join(CAPABILITY_FLAGS)}"
        )
    off = [item for item in items if not settings.capability_enabled(item)]
    if off:
        flags = ", ".join(capability_off(item) for item in off)
        raise SettingsError(f"PROCESSOR_CAPABILITIES={value!r} lists {', '.join(off)}, but {flags}")
    return items


MAX_DECODE_THREADS = 256


def _usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's cpuset, taskset), else the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 2


def _side(env: _Reader, name: str, default: int) -> int:
    value = env.integer(name, default, 64, 2048)
    if value % 16:
        raise SettingsError(f"{name}={value}: must be a multiple of 16")
    return value


def _parse(env: _Reader) -> Settings:
    profile = env.choice("MODEL_PROFILE", "full", ("full", "tiny"))
    defaults = _GENERATION_DEFAULTS[profile]
    settings = Settings(
        image_enabled=env.flag("IMAGE_ENABLED", True),
        image_search_enabled=env.flag("IMAGE_SEARCH_ENABLED", True),
        voice_enabled=env.flag("VOICE_ENABLED", False),
        r2_enabled=env.flag("R2_ENABLED", False),
        image_search_db_path=Path(env.raw("IMAGE_SEARCH_DB_PATH", "app/image_search.db")),
        image_search_files_dir=Path(env.raw("IMAGE_SEARCH_FILES_DIR", "app/image_search_files/")),
        image_search_max_elements=env.integer("IMAGE_SEARCH_MAX_ELEMENTS", 1_000_000, 1),
        image_search_max_bytes=env.integer("IMAGE_SEARCH_MAX_BYTES", 20971520, 1024, 512 * 1024 * 1024),
        image_search_max_pixels=env.integer("IMAGE_SEARCH_MAX_PIXELS", 50_000_000, 1024),
        image_search_batch_size=env.integer("IMAGE_SEARCH_BATCH_SIZE", 8, 1, 256),
        image_decode_threads=env.integer(
            "IMAGE_DECODE_THREADS", min(MAX_DECODE_THREADS, _usable_cpus()), 1, MAX_DECODE_THREADS
        ),
        thumbnail_max_side=env.integer("THUMBNAIL_MAX_SIDE", 384, 64, 2048),
        thumbnails_at_index=env.flag("THUMBNAILS_AT_INDEX", True),
        image_search_db_r2_key=env.key("IMAGE_SEARCH_DB_R2_KEY", "image_search.db"),
        image_search_db_backup_enabled=env.flag("IMAGE_SEARCH_DB_BACKUP_ENABLED", True),
        image_search_db_backup_interval_seconds=env.integer("IMAGE_SEARCH_DB_BACKUP_INTERVAL_SECONDS", 1800, 10),
        image_search_db_backup_generations=env.integer("IMAGE_SEARCH_DB_BACKUP_GENERATIONS", 3, 1, 1000),
        image_search_index_build_points=env.integer("IMAGE_SEARCH_INDEX_BUILD_POINTS", 10000, 0, 10_000_000),
        r2_account_id=env.raw("R2_ACCOUNT_ID", ""),
        r2_endpoint_url=env.url("R2_ENDPOINT_URL", "", ("https", "http")),
        r2_access_key_id=env.raw("R2_ACCESS_KEY_ID", ""),
        r2_secret_access_key=env.raw("R2_SECRET_ACCESS_KEY", ""),
        r2_bucket_name=env.raw("R2_BUCKET_NAME", ""),
        r2_region=env.raw("R2_REGION", "auto"),
        r2_timeout_seconds=env.number("R2_TIMEOUT_SECONDS", 10.0, 0.5, 600.0),
        # what a process may ask of the store at once: an indexing processor's 8 uploads and 16 downloads
        # (processor/handlers/image_index.py), a sweep's or listing's 32 record reads (contract/jobs.py READ_AHEAD),
        # and the API's requests beside them in the one-process mode
        r2_max_connections=env.integer("R2_MAX_CONNECTIONS", 64, 1, 1000),
        local_storage_dir=Path(env.raw("LOCAL_STORAGE_DIR", "app/storage")),
        presign_ttl_seconds=env.integer("PRESIGN_TTL_SECONDS", 3600, 1, 7 * 24 * 3600),
        public_base_url=env.url("PUBLIC_BASE_URL", "", ("http", "https")),
        url_signing_key=_url_signing_key(env),
        amqp_url=env.url("AMQP_URL", "amqp://guest:guest@localhost:5672/", ("amqp", "amqps")),
        amqp_connect_timeout_seconds=env.number("AMQP_CONNECT_TIMEOUT_SECONDS", 30.0, 0.0),
        max_attempts=env.integer("MAX_ATTEMPTS", 5, 1, 100),
        max_interrupted_runs=env.integer("MAX_INTERRUPTED_RUNS", 3, 2, 100),
        qdrant_url=env.url("QDRANT_URL", "", ("http", "https")),
        qdrant_api_key=env.raw("QDRANT_API_KEY", ""),
        qdrant_collection=env.raw("QDRANT_COLLECTION", "images") or "images",
        model_profile=profile,  # type: ignore[arg-type]
        model_cache_dir=Path(env.raw("MODEL_CACHE_DIR", "app/models")),
        clip_model=env.raw("CLIP_MODEL", DEFAULT_CLIP_MODEL) or DEFAULT_CLIP_MODEL,
        clip_pretrained=env.raw("CLIP_PRETRAINED", DEFAULT_CLIP_PRETRAINED),
        torch_device=env.raw("TORCH_DEVICE", "auto") or "auto",
        image_model=env.raw("IMAGE_MODEL", DEFAULT_IMAGE_MODEL) or DEFAULT_IMAGE_MODEL,
        image_dtype=env.choice("IMAGE_DTYPE", "auto", TORCH_DTYPES),
        clip_dtype=env.choice("CLIP_DTYPE", "auto", TORCH_DTYPES),
        voice_dtype=env.choice("VOICE_DTYPE", "auto", TORCH_DTYPES),
        image_default_width=_side(env, "IMAGE_DEFAULT_WIDTH", defaults[0]),
        image_default_height=_side(env, "IMAGE_DEFAULT_HEIGHT", defaults[1]),
        image_default_steps=env.integer("IMAGE_DEFAULT_STEPS", defaults[2], 1, 100),
        image_default_guidance=env.number("IMAGE_DEFAULT_GUIDANCE", defaults[3], 0.0, 30.0),
        image_max_pixel_steps=env.integer("IMAGE_MAX_PIXEL_STEPS", _PIXEL_STEP_BUDGETS[profile], 64 * 64),
        voice_model=env.raw("VOICE_MODEL", DEFAULT_VOICE_MODEL) or DEFAULT_VOICE_MODEL,
        voice_max_ref_bytes=env.integer("VOICE_MAX_REF_BYTES", 10 * 1024 * 1024, 1024, 512 * 1024 * 1024),
        voice_max_ref_seconds=env.number("VOICE_MAX_REF_SECONDS", 30.0, 1.0, 600.0),
        voice_min_ref_seconds=env.number("VOICE_MIN_REF_SECONDS", 1.0, 0.1, 60.0),
        voice_max_text_chars=env.integer("VOICE_MAX_TEXT_CHARS", 5000, 1, 100_000),
        voice_chunk_chars=env.integer("VOICE_CHUNK_CHARS", 250, 20, 2000),
        voice_ref_prefix=_prefix(env, "VOICE_REF_PREFIX", "voice/refs/"),
        voice_mp3_bitrate_kbps=int(env.choice("VOICE_MP3_BITRATE_KBPS", "128", ("64", "96", "128", "160"))),
        watch_prefixes=_prefixes(env, "WATCH_PREFIXES", "images/incoming/"),
        processor_metrics_port=env.integer("PROCESSOR_METRICS_PORT", 9101, 0, 65535),
        processor_capabilities=(),
        job_record_ttl_days=env.integer("JOB_RECORD_TTL_DAYS", 7, 1, 3650),
        output_ttl_days=_output_ttl_days(env),
        job_events_enabled=env.flag("JOB_EVENTS_ENABLED", True),
        callback_hosts=_callback_hosts(env),
        callback_secrets=_callback_secrets(env),
        callback_timeout_seconds=env.number("CALLBACK_TIMEOUT_SECONDS", 10.0, 0.5, 120.0),
        callback_allow_private_addresses=env.flag("CALLBACK_ALLOW_PRIVATE_ADDRESSES", False),
        host=env.raw("HOST", "0.0.0.0"),
        port=env.integer("PORT", 8000, 1, 65535),
        http_max_request_line_bytes=env.integer("HTTP_MAX_REQUEST_LINE_BYTES", 8190, 256, 1024 * 1024),
        http_max_headers=env.integer("HTTP_MAX_HEADERS", 100, 10, 10_000),
        http_max_header_bytes=env.integer("HTTP_MAX_HEADER_BYTES", 32 * 1024, 1024, 1024 * 1024),
        http_read_timeout_seconds=env.number("HTTP_READ_TIMEOUT_SECONDS", 30.0, 1.0, 3600.0),
        http_keepalive_seconds=env.integer("HTTP_KEEPALIVE_SECONDS", 5, 1, 600),
        rate_limit_per_minute=env.integer("RATE_LIMIT_PER_MINUTE", 0, 0, 1_000_000),
        cors_origins=_list(env, "CORS_ORIGINS"),
        allowed_hosts=_list(env, "ALLOWED_HOSTS"),
        sync_timeout_seconds=env.number("SYNC_TIMEOUT_SECONDS", 120.0, 0.1),
        log_level=env.choice("LOG_LEVEL", "info", ("debug", "info", "warning", "error")),
        log_format=env.choice("LOG_FORMAT", "json", ("json", "console")),  # type: ignore[arg-type]
    )
    _check_r2(settings)
    settings = dataclasses.replace(
        settings, processor_capabilities=_capabilities(env, settings), api_keys=_api_keys(env)
    )
    if settings.voice_min_ref_seconds >= settings.voice_max_ref_seconds:
        raise SettingsError(
            f"VOICE_MIN_REF_SECONDS={settings.voice_min_ref_seconds:g} must be below "
            f"VOICE_MAX_REF_SECONDS={settings.voice_max_ref_seconds:g}"
        )
    return settings


def _output_ttl_days(env: _Reader) -> float | None:
    """OUTPUT_TTL_DAYS: unset keeps generated outputs; else how long after its job finished one is deleted, at most
    as long as the job's record is kept (JOB_RECORD_TTL_DAYS), with which it goes at the latest."""
    if not env.raw("OUTPUT_TTL_DAYS", ""):
        return None
    record_days = env.integer("JOB_RECORD_TTL_DAYS", 7, 1, 3650)
    days = env.number("OUTPUT_TTL_DAYS", record_days, 0.01)
    if days > record_days:
        raise SettingsError(
            f"OUTPUT_TTL_DAYS={env.raw('OUTPUT_TTL_DAYS', '')} is longer than JOB_RECORD_TTL_DAYS={record_days}: a "
            "generated output is deleted with its job's record at the latest; raise JOB_RECORD_TTL_DAYS to keep "
            "outputs longer"
        )
    return days


def _check_r2(settings: Settings) -> None:
    if not settings.r2_enabled:
        return
    missing = [
        name
        for name, value in (
            ("R2_ACCESS_KEY_ID", settings.r2_access_key_id),
            ("R2_SECRET_ACCESS_KEY", settings.r2_secret_access_key),
            ("R2_BUCKET_NAME", settings.r2_bucket_name),
        )
        if not value
    ]
    if not settings.r2_endpoint_url and not settings.r2_account_id:
        missing.insert(0, "R2_ACCOUNT_ID (or R2_ENDPOINT_URL)")
    if missing:
        raise SettingsError(f"R2_ENABLED=1 but {', '.join(missing)} not set")


def known_variables() -> frozenset[str]:
    """Every environment variable the settings read."""
    return frozenset(variables())


def variables() -> dict[str, Variable]:
    """Every environment variable the settings read, and how (README.md's tables document each)."""
    reader = _Reader({})
    _parse(reader)
    return reader.variables
