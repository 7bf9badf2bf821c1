"""The deployment files, checked statically (there is no Docker here): docker-compose.yml, the Dockerfile,
.env.example and the RabbitMQ definitions. The definitions are also loaded into the test broker for real."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import aio_pika
import yaml

from infra.broker import CAPABILITY_QUEUES, declare_topology
from infra.broker_definitions import DEFINITIONS_FILE, rendered
from infra.settings import CAPABILITY_FLAGS, known_variables

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
OURS = {name: service for name, service in SERVICES.items() if "build" in service}
# read by libraries, not by our settings
THIRD_PARTY_VARIABLES = {"HF_HOME"}


def _stages() -> dict[str, str]:
    """Dockerfile stage name -> what it is built FROM."""
    stages = {}
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        match = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            stages[match.group(2)] = match.group(1)
    return stages


def test_the_services_of_the_design_are_there():
    assert {"rabbitmq", "rabbitmq-init", "minio", "minio-init", "qdrant", "api", "processor-index"} <= set(SERVICES)
    processors = {name: service for name, service in OURS.items() if name.startswith("processor-")}
    served = {service["environment"]["PROCESSOR_CAPABILITIES"] for service in processors.values()}
    assert served == set(CAPABILITY_FLAGS), "a processor for every capability"
    gpu = [name for name, service in processors.items() if "gpu" in service.get("profiles", [])]
    assert gpu and all(
        service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
        for name, service in processors.items()
        if name in gpu
    )
    assert {"cpu", "gpu"} <= {profile for service in processors.values() for profile in service.get("profiles", [])}


def test_every_build_target_is_a_dockerfile_stage_and_every_stage_builds_on_a_known_one():
    stages = _stages()
    for name, service in OURS.items():
        assert service["build"]["target"] in stages, name
    for stage, parent in stages.items():
        assert parent in stages or ":" in parent or "${" in parent, (stage, parent)
    assert stages["processor"] == "torch-cuda" and stages["processor-cpu"] == "torch-cpu"
    assert stages["api"] == "torch-cpu"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "USER app" in dockerfile and "useradd" in dockerfile


def test_every_command_names_a_module_that_exists():
    for name, service in OURS.items():
        command = service["command"]
        assert command[:2] == ["python", "-m"], name
        assert importlib.util.find_spec(command[2]) is not None, (name, command)


def test_our_services_set_only_variables_the_settings_know():
    known = known_variables() | THIRD_PARTY_VARIABLES
    for name, service in OURS.items():
        unknown = set(service["environment"]) - known
        assert not unknown, (name, unknown)
    assert "PROCESSOR_CAPABILITIES" in known


def test_every_setting_in_dot_env_reaches_our_services():
    for name, service in OURS.items():
        assert service["env_file"] == ".env", name


def test_health_checks_and_start_order():
    for name, service in SERVICES.items():
        if service.get("restart") == "no":
            continue  # one-shot init containers
        assert "healthcheck" in service, name
    for name, service in OURS.items():
        depends = service["depends_on"]
        assert depends["rabbitmq-init"]["condition"] == "service_completed_successfully", name
        assert depends["qdrant"]["condition"] == "service_healthy", name
        assert depends["minio-init"] == {"condition": "service_completed_successfully", "required": False}, name
    assert SERVICES["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert SERVICES["rabbitmq-init"]["depends_on"]["rabbitmq"]["condition"] == "service_healthy"


def test_the_broker_lets_a_long_job_run_past_rabbitmqs_default_consumer_timeout(rabbit):
    """A processor acks a job once it is done and durable; RabbitMQ closes a channel whose delivery stays
    unacknowledged past consumer_timeout (30 min by default). Our brokers read infra/rabbitmq/rabbitmq.conf: the
    compose stack's, scripts/local-rabbitmq.sh's node and the test harness's, which reads it here for real."""
    conf = "./infra/rabbitmq/rabbitmq.conf:/etc/rabbitmq/conf.d/20-ams.conf:ro"
    assert conf in SERVICES["rabbitmq"]["volumes"]
    assert "infra/rabbitmq/rabbitmq.conf" in (ROOT / "scripts" / "local-rabbitmq.sh").read_text()
    timeout = rabbit.ctl("eval", "application:get_env(rabbit, consumer_timeout).").stdout.strip()
    assert timeout == "{ok,14400000}"  # 4 hours


def test_named_volumes_are_declared_and_models_are_cached_in_one():
    declared = set(COMPOSE["volumes"])
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith("."):
                assert source in declared, (name, volume)
            else:
                assert (ROOT / source).exists(), (name, volume)
    for service in OURS.values():
        assert "models:/models" in service["volumes"]
        assert service["environment"]["MODEL_CACHE_DIR"] == "/models"


def test_env_example_covers_every_required_variable_and_holds_no_secret():
    text = (ROOT / "docker-compose.yml").read_text()
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", text))
    example = dict(
        line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines() if line and line[0] != "#"
    )
    assert required <= set(example)
    for name, value in example.items():
        if "PASSWORD" in name or "SECRET" in name:
            assert value.startswith("change-me"), name
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert ".env" in ignored


def test_the_minio_notification_targets_our_exchange_and_routing_key():
    environment = SERVICES["minio"]["environment"]
    assert environment["MINIO_NOTIFY_AMQP_EXCHANGE_AMS"] == "ams.jobs"
    assert environment["MINIO_NOTIFY_AMQP_ROUTING_KEY_AMS"] == "bucket.event"
    init = (ROOT / "infra" / "minio" / "init.sh").read_text()
    assert "arn:minio:sqs::AMS:amqp" in init and "--prefix images/incoming/" in init


def test_definitions_file_is_current():
    assert DEFINITIONS_FILE.read_text() == rendered(), "run: python -m infra.broker_definitions"


async def test_definitions_load_into_a_real_broker_and_agree_with_the_declared_topology(make_env, rabbit):
    """Loaded first (as rabbitmq-init does), then declared by the product: any disagreement is a 406."""
    env = make_env()
    vhost = env["VHOST"]
    text = DEFINITIONS_FILE.read_text().replace('"vhost": "/"', f'"vhost": "{vhost}"')
    path = Path(rabbit.workdir) / f"definitions-{vhost}.json"
    path.write_text(text)
    rabbit.ctl("import_definitions", str(path))
    connection = await aio_pika.connect(env["AMQP_URL"])
    async with connection:
        await declare_topology(connection)
    counts = rabbit.queue_counts(vhost)
    assert {name for name, _ in CAPABILITY_QUEUES.values()} <= set(counts)
