"""Settings precedence and the exit-2 rule for invalid values."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from config import SettingsError, load


def test_precedence_defaults_file_env_flags(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text(
        'port = 9001\nworkers = 2\nip_rate_limit = 5\ncors_origins = ["https://a.example"]\n'
    )
    s = load(str(f), env={})
    assert (s.port, s.workers, s.ip_rate_limit, s.cors_origins) == (
        9001,
        2,
        5,
        ["https://a.example"],
    )
    s = load(str(f), env={"TOLLWAY_PORT": "9002", "TOLLWAY_ALLOW_PRIVATE_UPSTREAMS": "true"})
    assert s.port == 9002 and s.allow_private_upstreams is True and s.workers == 2
    s = load(str(f), env={"TOLLWAY_PORT": "9002"}, overrides={"port": 9003})
    assert s.port == 9003
    assert (
        load(env={}).database_url == "sqlite:///./data/tollway.db"
        and load(env={}).redis_url is None
    )


@pytest.mark.parametrize(
    "env,name",
    [
        ({"TOLLWAY_PORT": "eighty"}, "port"),
        ({"TOLLWAY_PORT": "70000"}, "port"),
        ({"TOLLWAY_WORKERS": "0"}, "workers"),
        ({"TOLLWAY_DATABASE_URL": "mysql://x"}, "database_url"),
        ({"TOLLWAY_REDIS_URL": "http://x"}, "redis_url"),
        ({"TOLLWAY_ALLOW_PRIVATE_UPSTREAMS": "maybe"}, "allow_private_upstreams"),
        ({"TOLLWAY_PLATFORM_FEE_BPS": "20000"}, "platform_fee_bps"),
        ({"TOLLWAY_ADMIN_KEY": "nocolon"}, "admin_key"),
        ({"TOLLWAY_HOLD_TTL_SECONDS": "1"}, "hold_ttl_seconds"),
    ],
)
def test_invalid_value_names_the_setting(env, name):
    with pytest.raises(SettingsError) as e:
        load(env=env)
    assert e.value.setting == name and name in str(e.value)


def test_unknown_key_in_file_is_refused(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text("prot = 1\n")
    with pytest.raises(SettingsError) as e:
        load(str(f), env={})
    assert e.value.setting == "prot"


def test_invalid_config_exits_2_with_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_")}
    env["TOLLWAY_UPSTREAM_READ_TIMEOUT"] = "soon"
    r = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "upstream_read_timeout" in lines[0]
    f = tmp_path / "bad.toml"
    f.write_text('workers = "many"\n')
    r = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "serve", "--config", str(f)],
        env={k: v for k, v in env.items() if k != "TOLLWAY_UPSTREAM_READ_TIMEOUT"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert r.returncode == 2 and "workers" in r.stderr


def test_readme_documents_every_setting():
    import dataclasses
    import pathlib

    from config.settings import Settings

    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("## API overview", 1)[0]
    missing = [f.name for f in dataclasses.fields(Settings) if f"`{f.name}`" not in table]
    assert not missing, f"README configuration table lacks {missing}"


def test_migrate_command_applies_then_reports_up_to_date(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_")}
    cmd = [
        sys.executable,
        "-m",
        "proxy.cli",
        "migrate",
        "--database-url",
        f"sqlite:///{tmp_path}/m.db",
    ]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and "applied migrations: [1, 2" in first.stdout
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0 and "up to date" in second.stdout
