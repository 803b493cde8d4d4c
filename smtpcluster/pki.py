"""A new cluster's secrets: the peer key, the admin token, and a CA with a TLS
certificate for each node (`smtpcluster cluster init`), made with the openssl
command (Debian's openssl package) so no crypto code of ours is involved.

Every file is created 0600 (0640 for what the service's group must read, once the
operator gives it that group); nothing existing is overwritten.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

CA_DAYS = 3650
CERT_DAYS = 825  # the longest validity clients accept for a server certificate


class PkiError(Exception):
    exit_code = 1


@dataclass(frozen=True)
class NodeName:
    id: str
    host: str  # an IP address or a DNS name, put in the certificate's subjectAltName

    @staticmethod
    def parse(text: str) -> NodeName:
        node, eq, host = text.partition("=")
        if not eq or not node or not host:
            raise PkiError(f"{text!r}: give ID=HOST, e.g. node1=10.0.0.1")
        return NodeName(node, host)

    def alt_name(self) -> str:
        is_ip = all(c in "0123456789.:abcdefABCDEF" for c in self.host) and any(
            c in ".:" for c in self.host
        )
        return f"IP:{self.host}" if is_ip else f"DNS:{self.host}"


def _openssl(*args: str) -> None:
    try:
        subprocess.run(["openssl", *args], check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise PkiError("the openssl command is missing: install Debian's openssl") from None
    except subprocess.CalledProcessError as exc:
        raise PkiError(f"openssl {args[0]} failed: {exc.stderr.strip()[:300]}") from None


def _secret_file(path: Path, text: str, mode: int = 0o640) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.chmod(path, mode)  # whatever the umask said


def self_signed(cert: Path, key: Path, common_name: str, days: int = 365) -> None:
    """A self-signed pair for a first run (`smtpcluster dev`) or a test."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", str(days),
             "-subj", f"/CN={common_name}", "-keyout", str(key), "-out", str(cert))  # fmt: skip
    os.chmod(key, 0o600)


def init(where: Path, nodes: list[NodeName], hostname: str) -> list[Path]:
    """The files of a new cluster under `where`; returns them. Refuses to overwrite."""
    targets = [where / f for f in ("cluster.key", "admin.token", "ca.key", "ca.crt")]
    targets += [where / n.id / f for n in nodes for f in ("tls.key", "tls.crt")]
    if existing := [str(p) for p in targets if p.exists()]:
        raise PkiError(f"refusing to overwrite {', '.join(existing)}")
    where.mkdir(parents=True, exist_ok=True)
    _secret_file(where / "cluster.key", secrets.token_hex(32))
    _secret_file(where / "admin.token", secrets.token_hex(24))
    ca_key, ca_crt = where / "ca.key", where / "ca.crt"
    _openssl("req", "-x509", "-newkey", "rsa:3072", "-nodes", "-days", str(CA_DAYS),
             "-subj", "/CN=smtpcluster cluster CA", "-keyout", str(ca_key), "-out", str(ca_crt),
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    os.chmod(ca_key, 0o600)  # signs certificates: keep it off the nodes once done
    for node in nodes:
        _node_cert(where / node.id, node, hostname, ca_key, ca_crt)
    return targets


def _node_cert(where: Path, node: NodeName, hostname: str, ca_key: Path, ca_crt: Path) -> None:
    where.mkdir(exist_ok=True)
    key, crt = where / "tls.key", where / "tls.crt"
    names = ",".join(dict.fromkeys([f"DNS:{hostname}", f"DNS:{node.id}", node.alt_name()]))
    with tempfile.TemporaryDirectory() as scratch:
        csr = Path(scratch) / "tls.csr"
        _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={hostname}",
                 "-keyout", str(key), "-out", str(csr),
                 "-addext", f"subjectAltName={names}",
                 "-addext", "extendedKeyUsage=serverAuth,clientAuth")  # fmt: skip
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
                 "-set_serial", str(secrets.randbits(63)), "-days", str(CERT_DAYS),
                 "-copy_extensions", "copy", "-out", str(crt))  # fmt: skip
    os.chmod(key, 0o640)
