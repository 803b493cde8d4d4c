"""What an operator installs: the systemd unit passes `systemd-analyze verify` and
scores "OK" (at most 3.0) on `systemd-analyze security`; every conf/ example passes
check-config once `cluster init` made its files; `cluster init` makes a CA whose
node certificates verify, with secrets unreadable by others."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from smtpcluster.auth import Users, hash_password

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "smtpcluster.service"
EXAMPLES = sorted((REPO / "conf").rglob("*.toml"))
CLI = [sys.executable, "-P", "-m", "smtpcluster.cli"]
INSTALLED = "/opt/smtpcluster/bin/smtpcluster"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=REPO, check=False)


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    # verify insists that ExecStart exists: point it at this checkout's install.
    here = Path(sys.executable).parent / "smtpcluster"
    unit = tmp_path / "smtpcluster.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED, str(here)))
    verify = ["systemd-analyze", "verify", str(unit)]
    out = subprocess.run(verify, check=False, capture_output=True, text=True)
    assert out.returncode == 0 and out.stderr == "", out.stderr


def test_systemd_unit_is_hardened_to_ok() -> None:
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=30", str(UNIT)],
        check=False, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-500:]
    assert "OK" in out.stdout.splitlines()[-1]


def _secrets(tmp_path: Path) -> Path:
    etc = tmp_path / "etc"
    nodes = [f"node{k}=127.0.0.{k}" for k in (1, 2, 3)]
    out = _cli("cluster", "init", "--dir", str(etc), "--hostname", "relay.test", *nodes)
    assert out.returncode == 0, out.stderr
    for name in ("tls.crt", "tls.key"):  # the three-VM layout: this VM's pair at the top
        shutil.copy(etc / "node1" / name, etc / name)
    (etc / "users").write_text(hash_password("app", "a-long-password") + "\n")
    return etc


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: str(p.relative_to(REPO / "conf")))
def test_conf_example_passes_check_config(example: Path, tmp_path: Path) -> None:
    etc = _secrets(tmp_path)
    config = tmp_path / example.name
    config.write_text(example.read_text().replace("/etc/smtpcluster", str(etc)))
    out = _cli("check-config", "--config", str(config))
    assert out.returncode == 0, out.stderr
    assert ": ok (node node" in out.stdout


def test_cluster_init_makes_a_verifying_ca_and_private_secrets(tmp_path: Path) -> None:
    etc = _secrets(tmp_path)
    for secret in ("cluster.key", "admin.token", "ca.key", "node2/tls.key"):
        assert stat.S_IMODE((etc / secret).stat().st_mode) & 0o007 == 0, secret
    assert stat.S_IMODE((etc / "ca.key").stat().st_mode) == 0o600
    out = subprocess.run(
        ["openssl", "verify", "-CAfile", str(etc / "ca.crt"), str(etc / "node3" / "tls.crt")],
        check=False, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    again = _cli("cluster", "init", "--dir", str(etc), "--hostname", "x", "node1=127.0.0.1")
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    bad = _cli("cluster", "init", "--dir", str(tmp_path / "new"), "--hostname", "relay host",
               "node1=127.0.0.1")  # fmt: skip
    assert bad.returncode == 2 and "not a host name" in bad.stderr  # as check-config says
    assert not (tmp_path / "new").exists()  # nothing written


def test_hash_password_prints_a_users_file_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [*CLI, "hash-password", "app1"], input="s3cret-pass\n", capture_output=True,
        text=True, cwd=REPO, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "s3cret-pass" not in out.stdout
    users = tmp_path / "users"
    users.write_text(out.stdout)
    loaded = Users.load(str(users))
    assert loaded.verify("app1", "s3cret-pass") and not loaded.verify("app1", "wrong")


@pytest.mark.parametrize("name", ["app:1", "app 1", ""])
def test_hash_password_refuses_a_name_its_users_file_could_not_hold(name: str) -> None:
    """Its line used to be printed, and the node then refused the users_file."""
    out = subprocess.run(
        [*CLI, "hash-password", name], input="s3cret-pass\n", capture_output=True,
        text=True, cwd=REPO, check=False,
    )  # fmt: skip
    assert out.returncode == 2 and out.stdout == "", out
    assert "a user name must not be empty, nor hold ':' or a space" in out.stderr
