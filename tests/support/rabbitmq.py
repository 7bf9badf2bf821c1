"""A throwaway RabbitMQ node from Debian's rabbitmq-server, on a free port in a temporary directory."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from infra.broker import UNROUTED_POLICY

BIN = Path("/usr/lib/rabbitmq/bin")
BROKER_CONFIG = Path(__file__).resolve().parents[2] / "infra" / "rabbitmq" / "rabbitmq.conf"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RabbitNode:
    def __init__(self, workdir: Path) -> None:
        if not (BIN / "rabbitmq-server").exists():
            raise RuntimeError("rabbitmq-server is not installed: apt-get install -y rabbitmq-server")
        self.port = free_port()
        self.node = f"test-{self.port}@localhost"
        self.workdir = workdir
        self.env = {
            **os.environ,
            "RABBITMQ_MNESIA_BASE": str(workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(workdir / "log"),
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_DIST_PORT": str(self.port + 20000 if self.port < 45000 else self.port - 20000),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(workdir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(workdir / "rabbitmq"),
            "RABBITMQ_PID_FILE": str(workdir / "pid"),
        }
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        (self.workdir / "enabled_plugins").write_text("[].")
        shutil.copyfile(BROKER_CONFIG, self.workdir / "rabbitmq.conf")  # as every broker we ship is configured
        log = (self.workdir / "server.log").open("wb")
        self._process = subprocess.Popen(
            [str(BIN / "rabbitmq-server")], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited: {(self.workdir / 'server.log').read_text()[-2000:]}")
            if self.ctl("await_startup", "--timeout", "5", check=False).returncode == 0:
                return
            time.sleep(0.5)
        raise RuntimeError("rabbitmq-server did not start within 90 s")

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Each run boots an Erlang VM (about a second of CPU): at the lowest priority, so that tests polling queue
        counts do not slow the code under test on the same two cores."""
        return subprocess.run(
            ["nice", "-n", "19", str(BIN / "rabbitmqctl"), "-q", "-n", self.node, *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=check,
            timeout=60,
        )

    def add_vhost(self, name: str) -> str:
        """Create an isolated virtual host, with the policy every deployment sets (README, Queues and scale-out), and
        return its AMQP URL. One `rabbitmqctl eval` does all three steps: each rabbitmqctl run starts an Erlang VM,
        about a second of CPU."""
        if not name.isalnum():
            raise ValueError(f"virtual host names here are alphanumeric, not {name!r}")
        policy, pattern, definition = UNROUTED_POLICY
        [(key, value)] = json.loads(definition).items()
        escaped = pattern.replace("\\", "\\\\")
        self.ctl(
            "eval",
            f'V = <<"{name}">>, ok = rabbit_vhost:add(V, <<"tests">>), '
            'ok = rabbit_auth_backend_internal:set_permissions(<<"guest">>, V, <<".*">>, <<".*">>, <<".*">>, '
            '<<"tests">>), '
            f'ok = rabbit_policy:set(V, <<"{policy}">>, <<"{escaped}">>, [{{<<"{key}">>, <<"{value}">>}}], 0, '
            '<<"exchanges">>, <<"tests">>).',
        )
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{name}"

    def queue_counts(self, vhost: str) -> dict[str, tuple[int, int]]:
        """queue name -> (ready, unacknowledged)."""
        out = self.ctl("list_queues", "-p", vhost, "name", "messages_ready", "messages_unacknowledged").stdout
        counts: dict[str, tuple[int, int]] = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1].isdigit():
                counts[parts[0]] = (int(parts[1]), int(parts[2]))
        return counts

    def stop(self) -> None:
        if self._process is None:
            return
        self.ctl("stop", check=False)
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
        shutil.rmtree(self.workdir / "mnesia", ignore_errors=True)
