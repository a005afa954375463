"""Certificates and keys for a test federation (``make certs``, ``fedfinn deploy``).

Writes into one folder:

* ``ca.crt`` / ``ca.key``: a self-signed certificate authority (EC P-384);
* ``server.crt`` / ``server.key``: the SuperLink's TLS certificate, signed by
  the CA, valid for ``localhost``, ``127.0.0.1``, ``::1`` and every extra
  host name or IP address given (the SuperLink's address as the SuperNodes
  and the ``flwr`` CLI dial it);
* ``node_<i>.key`` / ``node_<i>.pub``: one EC P-384 key pair per SuperNode in
  OpenSSH format, for Flower's SuperNode authentication: the SuperLink
  (``--enable-supernode-auth``) only accepts nodes whose public key was
  registered (``flwr supernode register node_<i>.pub``), and each node signs
  its requests with its private key (``--auth-supernode-private-key``).

Made with the ``cryptography`` package (a dependency of flwr, which uses it
for the same keys). Private keys are written with mode 0600. These are for a
test federation: a production SuperLink wants a certificate from a CA its
operators control.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import secrets
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_DIR = "build/certs"


FOLDER_MODE = 0o755  # what others may see: certificates and public keys; private keys are 0600 inside


def _folder(path: Path) -> None:
    """The certificate folder, created with an explicit mode (the umask does not decide it)."""
    path.mkdir(parents=True, exist_ok=True)
    if path.stat().st_mode & 0o022:
        path.chmod(FOLDER_MODE)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Write ``path`` atomically with mode 0600 (private) or 0644, whatever the umask or a file left there.

    The data go into a fresh temporary file (``O_EXCL``: a file or link already at that name is never
    written through; ``O_NOFOLLOW``: no link is followed), whose mode is set explicitly before the rename.
    """
    _folder(path.parent)
    mode = 0o600 if private else 0o644
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in dict.fromkeys(["localhost", "127.0.0.1", "::1", *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_certs(out: str | os.PathLike, nodes: int = 0, hosts: list[str] | None = None, days: int = 365) -> Path:
    """Write the CA, the SuperLink certificate and ``nodes`` SuperNode key pairs into ``out``."""
    out = Path(out)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedfinn test federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA384()))

    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedfinn SuperLink")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(_san(list(hosts or [])), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))

    _write(out / "ca.key", _pem_key(ca_key), private=True)
    _write(out / "ca.crt", ca.public_bytes(serialization.Encoding.PEM))
    _write(out / "server.key", _pem_key(key), private=True)
    _write(out / "server.crt", cert.public_bytes(serialization.Encoding.PEM))
    for i in range(nodes):
        make_node_key(out, i)
    return out


def make_node_key(out: str | os.PathLike, index: int) -> tuple[Path, Path]:
    """One SuperNode's authentication key pair: ``node_<index>.key`` (private) and ``.pub``."""
    out = Path(out)
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(out / f"node_{index}.key", priv, private=True)
    _write(out / f"node_{index}.pub", pub + f" fedfinn-node-{index}\n".encode())
    return out / f"node_{index}.key", out / f"node_{index}.pub"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.certs", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=DEFAULT_DIR, help=f"output folder (default {DEFAULT_DIR})")
    p.add_argument("--nodes", type=int, default=4, help="SuperNode key pairs to make (default 4)")
    p.add_argument("--host", action="append", default=[],
                   help="extra host name or IP address of the SuperLink (repeatable; localhost is always in)")
    p.add_argument("--days", type=int, default=365)
    a = p.parse_args(argv)
    hosts = [h for item in a.host for h in item.replace(",", " ").split()]
    out = make_certs(a.out, a.nodes, hosts, a.days)
    print(f"CA, SuperLink certificate ({', '.join(['localhost', '127.0.0.1', '::1', *hosts])}) "
          f"and {a.nodes} SuperNode key pair(s) in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
