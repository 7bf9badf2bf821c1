"""API keys: three levels, 401 without a valid key, 403 for a key below what the route needs; health endpoints and
signed file links stay open."""

from __future__ import annotations

import hashlib

import pytest

from api.app import create_app
from api.auth import ACCESS, AccessGuard
from api.page import page_files
from api.routes import ROUTES, VOICE_UPLOAD_ROUTES
from infra.settings import Settings, SettingsError
from tests.support.images import encoded
from tests.support.server import running_server

READ_KEY, WRITE_KEY, ADMIN_KEY = "r" * 20, "w" * 24, "a-secret-admin-key-0123"


@pytest.fixture(scope="module")
async def server(make_env, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("keys") / "api-keys"
    digest = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
    keys_file.write_text(f"# operators\nadmin sha256:{digest} ops-team\n")
    env = make_env(API_KEYS=f"read:{READ_KEY},write:{WRITE_KEY}", API_KEYS_FILE=str(keys_file))
    async with running_server(Settings.from_env(env)) as running:
        yield running


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_without_a_valid_key_every_data_route_is_401(server):
    client = server.client
    for headers in ({}, bearer("not-a-key-at-all-really"), {"Authorization": f"Basic {READ_KEY}"}):
        for method, path in (("GET", "/v1/images"), ("POST", "/v1/images/search"), ("GET", "/metrics")):
            response = await client.request(method, path, headers=headers, json={"query": "x"})
            assert response.status_code == 401, (method, path, response.text)
            assert response.json()["code"] == "unauthorized"
            assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_each_level_reaches_what_it_should_and_no_further(server):
    client = server.client
    assert (await client.get("/v1/images", headers=bearer(READ_KEY))).status_code == 200
    refused = await client.post(
        "/v1/images", files={"file": ("a.png", encoded(1), "image/png")}, headers=bearer(READ_KEY)
    )
    assert refused.status_code == 403 and refused.json()["code"] == "forbidden"
    uploaded = await client.post(
        "/v1/images", files={"file": ("a.png", encoded(1), "image/png")}, headers=bearer(WRITE_KEY)
    )
    assert uploaded.status_code == 201
    image_id = uploaded.json()["id"]
    assert (await client.delete(f"/v1/images/{image_id}", headers=bearer(WRITE_KEY))).status_code == 403
    assert (await client.get("/metrics", headers=bearer(WRITE_KEY))).status_code == 403
    assert (await client.get("/metrics", headers=bearer(ADMIN_KEY))).status_code == 200
    assert (await client.delete(f"/v1/images/{image_id}", headers=bearer(ADMIN_KEY))).status_code == 204


async def test_health_docs_and_signed_links_stay_open(server):
    client = server.client
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/readyz")).status_code == 200
    assert (await client.get("/schema/openapi.json")).status_code == 200
    uploaded = await client.post(
        "/v1/images", files={"file": ("b.png", encoded(2), "image/png")}, headers=bearer(WRITE_KEY)
    )
    redirect = await client.get(f"/v1/images/{uploaded.json()['id']}/file", headers=bearer(READ_KEY))
    assert redirect.status_code in (302, 307)
    signed = await client.get(redirect.headers["location"])
    assert signed.status_code == 200 and signed.content == encoded(2)


def test_every_route_says_what_access_it_needs():
    for handler in [*ROUTES, *VOICE_UPLOAD_ROUTES]:
        assert handler.opt.get(ACCESS) in ("open", "read", "write", "admin"), handler


async def test_every_guarded_route_of_the_app_says_what_access_it_needs(server):
    """The routes Litestar adds (an OPTIONS handler for a path that has none) included: the guard refuses one that
    does not say with a 500."""
    app = create_app(server.services)
    for route in app.routes:
        for handler in getattr(route, "route_handlers", []):
            if any(isinstance(guard, AccessGuard) for guard in handler.resolve_guards()):
                assert handler.opt.get(ACCESS) in ("open", "read", "write", "admin"), (route.path, handler)
    version = page_files().version
    for path in ("/", f"/ui/{version}/styles.css"):
        answer = await server.client.options(path)
        assert answer.status_code == 204 and answer.headers["allow"] == "GET, OPTIONS", (path, answer.text)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [("write:short", "at least 16"), ("owner:" + "k" * 20, "level"), ("just-a-key-without-level", "level:key")],
)
def test_bad_api_keys_are_a_configuration_error(value, fragment):
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({"API_KEYS": value})
    assert fragment in str(refused.value)
    assert "k" * 20 not in str(refused.value), "a key is never echoed"
