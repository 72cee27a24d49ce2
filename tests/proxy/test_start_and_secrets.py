"""Secrets stay out of logs and errors; failures at start are one line (issue 11)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from config.redact import redact_url, scrub
from tests.support.tollway import free_port, start_processes
from tests.support.upstream import Upstream


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_")}
    env.update(extra)
    return env


def _tollway(*args: str, env: dict[str, str], cwd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_redaction_masks_passwords_queries_and_key_paths():
    assert redact_url("redis://:hunter2@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert "hunter2" not in redact_url("postgresql://app:hunter2@db/prod")
    assert "k3y" not in redact_url("https://node.example/rpc?apikey=k3y")
    text = scrub("EVM node error: cannot reach https://eth.example/v2/AbCdEfGhIjKlMnOpQrStUv12 now")
    assert "AbCdEfGhIjKlMnOpQrStUv12" not in text and "eth.example" in text


async def test_redis_password_is_not_in_the_log(tmp_path, upstream: Upstream):
    password = "pw-" + os.urandom(8).hex()
    url = f"redis://:{password}@127.0.0.1:6379/0"
    tw = await start_processes(f"sqlite:///{tmp_path}/r.db", url, str(tmp_path), log_level="info")
    try:
        prov = await tw.key("prov", "provider")
        sid = await tw.service(prov, upstream.url)
        buyer = await tw.key("buyer")
        for _ in range(3):
            await tw.call(sid, "ok", buyer)
    finally:
        await tw.close()
    with open(tw.logs[0]) as f:
        log = f.read()
    assert "listening" in log and password not in log


def test_ledger_verify_of_a_missing_database_exits_2(tmp_path):
    missing = tmp_path / "no" / "such" / "dir" / "x.db"
    r = _tollway(
        "ledger", "verify", "--database-url", f"sqlite:///{missing}", env=_env(), cwd=str(tmp_path)
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "no database" in r.stderr
    assert not missing.parent.exists()  # nothing was created
    r = _tollway(
        "ledger",
        "verify",
        "--database-url",
        "postgresql://postgres@127.0.0.1:5432/tollway_no_such_db_" + os.urandom(4).hex(),
        env=_env(),
        cwd=str(tmp_path),
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_failures_at_start_are_one_line(tmp_path):
    # the port is already taken
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = _tollway(
            "serve",
            env=_env(TOLLWAY_PORT=str(port), TOLLWAY_DATABASE_URL=f"sqlite:///{tmp_path}/p.db"),
            cwd=str(tmp_path),
        )
    assert r.returncode != 0
    lines = [x for x in r.stderr.strip().splitlines() if x.startswith("tollway:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    # PostgreSQL unreachable (nothing listens on this port), its password never printed
    dead = free_port()
    r = _tollway(
        "serve",
        env=_env(
            TOLLWAY_PORT=str(free_port()),
            TOLLWAY_DATABASE_URL=f"postgresql://app:s3cr3tpw@127.0.0.1:{dead}/x",
        ),
        cwd=str(tmp_path),
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "s3cr3tpw" not in r.stderr + r.stdout
    assert len([x for x in r.stderr.strip().splitlines() if x.startswith("tollway:")]) == 1
