"""Settings: the seed's variables and defaults, and one clear line for a bad value."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from infra.settings import Settings, SettingsError, variables

ROOT = Path(__file__).resolve().parent.parent


def test_seed_defaults():
    settings = Settings.from_env({})
    assert settings.image_enabled is True
    assert settings.image_search_enabled is True
    assert settings.voice_enabled is False
    assert settings.r2_enabled is False
    assert settings.image_search_db_path == Path("app/image_search.db")
    assert settings.image_search_files_dir == Path("app/image_search_files/")
    assert settings.image_search_max_elements == 1_000_000
    assert settings.image_search_max_bytes == 20971520
    assert settings.image_search_db_r2_key == "image_search.db"
    assert settings.image_search_db_backup_enabled is True
    assert settings.image_search_db_backup_interval_seconds == 1800
    assert settings.amqp_url == "amqp://guest:guest@localhost:5672"
    assert settings.embedded_qdrant
    assert settings.model_profile == "full"
    assert settings.port == 8000


def test_r2_endpoint_is_derived_from_the_account_id():
    env = {
        "R2_ENABLED": "1",
        "R2_ACCOUNT_ID": "abc123",
        "R2_ACCESS_KEY_ID": "k",
        "R2_SECRET_ACCESS_KEY": "s",
        "R2_BUCKET_NAME": "b",
    }
    assert Settings.from_env(env).r2_effective_endpoint == "https://abc123.r2.cloudflarestorage.com"
    explicit = Settings.from_env({**env, "R2_ENDPOINT_URL": "https://r2.example.com/"})
    assert explicit.r2_effective_endpoint == "https://r2.example.com"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"IMAGE_SEARCH_ENABLED": "maybe"}, "IMAGE_SEARCH_ENABLED"),
        ({"IMAGE_SEARCH_MAX_BYTES": "lots"}, "IMAGE_SEARCH_MAX_BYTES"),
        ({"IMAGE_SEARCH_MAX_BYTES": "0"}, "IMAGE_SEARCH_MAX_BYTES"),
        ({"IMAGE_SEARCH_BATCH_SIZE": "0"}, "IMAGE_SEARCH_BATCH_SIZE"),
        ({"PORT": "70000"}, "PORT"),
        ({"MODEL_PROFILE": "small"}, "MODEL_PROFILE"),
        ({"AMQP_URL": "http://localhost"}, "AMQP_URL"),
        ({"QDRANT_URL": "localhost:6333"}, "QDRANT_URL"),
        ({"QDRANT_URL": "http://qdrant:abc"}, "QDRANT_URL: expected a port from 1 to 65535 after the host, not 'abc'"),
        ({"R2_ENDPOINT_URL": "https://example.com:99999"}, "R2_ENDPOINT_URL: expected a port from 1 to 65535"),
        ({"PUBLIC_BASE_URL": "https://api.example.com:0"}, "PUBLIC_BASE_URL: expected a port from 1 to 65535"),
        ({"IMAGE_SEARCH_DB_R2_KEY": "/abs/key"}, "IMAGE_SEARCH_DB_R2_KEY='/abs/key': expected an object key"),
        ({"IMAGE_SEARCH_DB_R2_KEY": "backups/../index"}, "IMAGE_SEARCH_DB_R2_KEY='backups/../index': expected an"),
        ({"IMAGE_SEARCH_DB_R2_KEY": ""}, "IMAGE_SEARCH_DB_R2_KEY='': expected an object key"),
        ({"SYNC_TIMEOUT_SECONDS": "-1"}, "SYNC_TIMEOUT_SECONDS"),
        ({"R2_ENABLED": "1"}, "R2_BUCKET_NAME"),
        ({"WATCH_PREFIXES": "/abs/"}, "WATCH_PREFIXES"),
        ({"WATCH_PREFIXES": " , "}, "WATCH_PREFIXES"),
        ({"WATCH_PREFIXES": "images/../secret/"}, "WATCH_PREFIXES"),
        ({"PROCESSOR_METRICS_PORT": "99999"}, "PROCESSOR_METRICS_PORT"),
        ({"VOICE_MP3_BITRATE_KBPS": "192"}, "VOICE_MP3_BITRATE_KBPS"),
        ({"VOICE_REF_PREFIX": "../refs/"}, "VOICE_REF_PREFIX"),
        ({"VOICE_MAX_REF_SECONDS": "0.5"}, "VOICE_MAX_REF_SECONDS"),
        ({"VOICE_MIN_REF_SECONDS": "20", "VOICE_MAX_REF_SECONDS": "10"}, "VOICE_MIN_REF_SECONDS"),
        ({"THUMBNAIL_MAX_SIDE": "63"}, "THUMBNAIL_MAX_SIDE=63: must be at least 64 and at most 2048"),
        ({"THUMBNAIL_MAX_SIDE": "2049"}, "THUMBNAIL_MAX_SIDE=2049: must be at least 64 and at most 2048"),
        ({"THUMBNAIL_MAX_SIDE": "large"}, "THUMBNAIL_MAX_SIDE='large': expected a whole number"),
        ({"CALLBACK_HOSTS": "https://hooks.example.com"}, "CALLBACK_HOSTS entry 'https://hooks.example.com'"),
        ({"CALLBACK_HOSTS": "a.example, bad host"}, "CALLBACK_HOSTS entry 'bad host'"),
        ({"CALLBACK_HOSTS": "*.10.0.0.1"}, "CALLBACK_HOSTS entry"),
        ({"CALLBACK_HOSTS": "hooks.example.com:99999"}, "CALLBACK_HOSTS entry"),
        ({"CALLBACK_SECRET": "hunter2"}, "CALLBACK_SECRET entry 1: expected whsec_"),
        ({"CALLBACK_SECRET": "whsec_c2hvcnQ="}, "CALLBACK_SECRET entry 1: expected whsec_ followed by 24 to 64"),
        ({"CALLBACK_TIMEOUT_SECONDS": "0"}, "CALLBACK_TIMEOUT_SECONDS"),
        ({"R2_TIMEOUT_SECONDS": "0"}, "R2_TIMEOUT_SECONDS"),
        ({"R2_TIMEOUT_SECONDS": "soon"}, "R2_TIMEOUT_SECONDS"),
        ({"R2_MAX_CONNECTIONS": "0"}, "R2_MAX_CONNECTIONS=0: must be at least 1 and at most 1000"),
        ({"URL_SIGNING_KEY": "secret"}, "URL_SIGNING_KEY: expected at least 32 characters"),
        ({"PROCESSOR_CAPABILITIES": "callback"}, "lists callback, but CALLBACK_HOSTS is empty"),
        ({"OUTPUT_TTL_DAYS": "0"}, "OUTPUT_TTL_DAYS=0: must be at least 0.01"),
        ({"OUTPUT_TTL_DAYS": "a week"}, "OUTPUT_TTL_DAYS='a week': expected a number"),
        ({"OUTPUT_TTL_DAYS": "8"}, "OUTPUT_TTL_DAYS=8 is longer than JOB_RECORD_TTL_DAYS=7"),
    ],
)
def test_bad_values_name_the_variable(env, variable):
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env(env)


def test_a_bad_port_in_a_url_does_not_show_the_url_which_may_hold_a_password():
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({"AMQP_URL": "amqp://guest:hunter2@rabbit:5672x/"})
    assert "AMQP_URL" in str(refused.value) and "hunter2" not in str(refused.value)
    assert Settings.from_env({"QDRANT_URL": "http://[::1]:6333/"}).qdrant_url == "http://[::1]:6333"
    assert Settings.from_env({"IMAGE_SEARCH_DB_R2_KEY": "backups/index"}).image_search_db_r2_key == "backups/index"


def test_thumbnail_max_side_defaults_to_384_and_takes_64_to_2048():
    assert Settings.from_env({}).thumbnail_max_side == 384
    assert Settings.from_env({"THUMBNAIL_MAX_SIDE": "64"}).thumbnail_max_side == 64
    assert Settings.from_env({"THUMBNAIL_MAX_SIDE": "2048"}).thumbnail_max_side == 2048


def test_image_decode_threads_default_to_the_cpus_the_process_may_use_at_most_256(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 384)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(384)))
    assert Settings.from_env({}).image_decode_threads == 256
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})  # a container's cpuset, taskset
    assert Settings.from_env({}).image_decode_threads == 3
    assert Settings.from_env({"IMAGE_DECODE_THREADS": "256"}).image_decode_threads == 256
    with pytest.raises(SettingsError, match="IMAGE_DECODE_THREADS=257: must be at least 1 and at most 256"):
        Settings.from_env({"IMAGE_DECODE_THREADS": "257"})


def test_callback_hosts_are_normalised_and_secrets_decoded():
    settings = Settings.from_env(
        {
            "CALLBACK_HOSTS": "Hooks.Example.com, *.internal.example:8443,[::1]:9000, hooks.example.com",
            "CALLBACK_SECRET": f"whsec_{'A' * 32},whsec_{'B' * 44}",
        }
    )
    assert settings.callback_hosts == ("hooks.example.com", "*.internal.example:8443", "[::1]:9000")
    assert [len(key) for key in settings.callback_secrets] == [24, 33]
    assert "callback" in settings.processor_capabilities
    assert "callback" not in Settings.from_env({}).processor_capabilities


def test_watch_prefixes_are_a_comma_separated_list():
    assert Settings.from_env({}).watch_prefixes == ("images/incoming/",)
    settings = Settings.from_env({"WATCH_PREFIXES": "images/incoming/, uploads/photos/"})
    assert settings.watch_prefixes == ("images/incoming/", "uploads/photos/")


def run_module(module: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("module", ["api", "processor"])
def test_bad_value_fails_startup_with_one_line(module):
    result = run_module(module, {"IMAGE_SEARCH_MAX_BYTES": "twenty"})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "IMAGE_SEARCH_MAX_BYTES" in lines[0]


def test_full_profile_without_the_hub_fails_with_one_clear_line(make_env, tmp_path):
    env = make_env(MODEL_PROFILE="full", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), LOG_LEVEL="error")
    result = run_module("api", env)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("start-up failed: cannot load CLIP model")
    assert "MODEL_PROFILE=tiny" in last
    assert "CLIP_MODEL" in last


def test_unreachable_broker_fails_with_one_clear_line(tmp_path):
    env = {
        "MODEL_PROFILE": "tiny",
        "AMQP_URL": "amqp://guest:secret@127.0.0.1:1/",
        "LOCAL_STORAGE_DIR": str(tmp_path / "s"),
        "AMQP_CONNECT_TIMEOUT_SECONDS": "1",
        "LOG_LEVEL": "error",
    }
    result = run_module("api", env)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "cannot reach RabbitMQ" in last
    assert "AMQP_URL" in last
    assert "secret" not in result.stderr


def test_processor_metrics_port_in_use_fails_start_up_with_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_module("processor", {"PROCESSOR_METRICS_PORT": str(port), "HOST": "127.0.0.1"})
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()[-1:]
    assert "PROCESSOR_METRICS_PORT" in line


# defaults the settings compute (the README says how) rather than give as text
COMPUTED_DEFAULTS = {"IMAGE_DECODE_THREADS"}


def _readme_settings() -> dict[str, tuple[str, str]]:
    """README's Configuration tables: each variable -> (its default as the table gives it, its whole row)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    documented: dict[str, tuple[str, str]] = {}
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        assert len(cells) == 3, row
        names = re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0])
        defaults = re.split(r"(?<=`), (?=`)", cells[1])  # one each (`a`, `b`), or one for all
        for position, name in enumerate(names):
            documented[name] = (defaults[position] if len(defaults) == len(names) else cells[1], row)
    return documented


def _shown(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


def test_every_variable_the_settings_read_is_documented_in_the_readme_with_its_default_and_range():
    """Each variable read is in README's Configuration tables and each one there is read; its row gives the
    default the code uses, its range (`low..high`, or `at least low`) and every value a choice may take."""
    documented = _readme_settings()
    read = variables()
    assert sorted(read.keys() - documented.keys()) == [], "read but not documented"
    assert sorted(documented.keys() - read.keys()) == [], "documented but not read"
    for name, variable in read.items():
        default, row = documented[name]
        given = re.findall(r"`([^`]*)`", default)
        if not given:
            assert variable.default == "" or name in COMPUTED_DEFAULTS, (name, variable.default, default)
        elif variable.minimum is not None:
            assert float(given[0]) == float(variable.default), (name, variable.default, default)
        else:
            assert given[0] == variable.default, (name, variable.default, default)
        if variable.maximum is not None:
            assert f"{_shown(variable.minimum)}..{_shown(variable.maximum)}" in row, (name, variable)
        elif variable.minimum is not None:
            assert f"at least {_shown(variable.minimum)}" in row, (name, variable)
        for choice in variable.choices:
            assert re.search(rf"\b{re.escape(choice)}\b", row.split("|")[3]), (name, choice)
