"""Celery message signing on real services: a worker with signing on runs the jobs of a CLI that
signs, and refuses a task message that is not signed (what anyone who can write to Redis could
send), which then never runs."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from jobs.worker_process import delete_prefixed_keys
from pipeline.settings import load_settings

from support.processes import (BROKER_URL, assert_one_error_line, cli, cli_ok, key_prefix, log_count,
                               pipeline_env, wait_until, worker)


def _signing_files(folder: Path) -> dict[str, str]:
    """A private key (owner-only) and its self-signed certificate, the only trusted one."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pipeline-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    (folder / "trusted").mkdir()
    key_path, cert_path = folder / "signing.key", folder / "trusted" / "signing.crt"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return {"PIPELINE_SECURITY_KEY_FILE": str(key_path), "PIPELINE_SECURITY_CERTIFICATE_FILE": str(cert_path),
            "PIPELINE_SECURITY_CERT_STORE": str(folder / "trusted" / "*.crt")}


def _job(env: dict[str, str], cwd: Path, job_id: str) -> dict:
    return json.loads(cli_ok(env, cwd, "status", job_id, "--json").stdout)


@pytest.mark.workers
def test_signed_messages_run_and_unsigned_ones_are_refused(pg_url: str, tmp_path: Path, redis_client) -> None:
    prefix = key_prefix()
    plain = pipeline_env(PIPELINE_DATABASE_URL=pg_url, PIPELINE_BROKER_URL=BROKER_URL,
                         PIPELINE_REDIS_KEY_PREFIX=prefix)
    signed = {**plain, **_signing_files(tmp_path)}
    cli_ok(plain, tmp_path, "db", "upgrade")
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "Hello", "max_tokens": 3, "temperature": 0}) + "\n")
    log = tmp_path / "worker.log"
    try:
        with worker(signed, tmp_path, log, "--concurrency", "1"):
            done = json.loads(cli_ok(signed, tmp_path, "submit", str(tmp_path / "in.jsonl"), "--wait", "--quiet",
                                     "--json").stdout)
            assert done["status"] == "completed" and done["request_counts"]["completed"] == 1

            # A sender without the key: its message reaches the queue, and the worker refuses it.
            forged = cli_ok(plain, tmp_path, "submit", str(tmp_path / "in.jsonl"), "--quiet").stdout.strip()
            wait_until(lambda: log_count(log, "Refusing to deserialize untrusted content of type json"),
                       "the worker refusing the unsigned message", log)
            job = _job(plain, tmp_path, forged)
            assert (job["status"], job["request_counts"]["completed"]) == ("in_progress", 0)
    finally:
        delete_prefixed_keys(redis_client, prefix)


def test_signing_settings_go_together(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="message signing needs security_key_file, security_certificate_file"):
        load_settings(env={"PIPELINE_SECURITY_KEY_FILE": str(tmp_path / "k.pem")})
    env = pipeline_env(PIPELINE_DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
                       PIPELINE_SECURITY_KEY_FILE=str(tmp_path / "missing.key"),
                       PIPELINE_SECURITY_CERTIFICATE_FILE=str(tmp_path / "missing.crt"),
                       PIPELINE_SECURITY_CERT_STORE=str(tmp_path / "*.crt"))
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "Hello"}) + "\n")
    cli_ok(env, tmp_path, "db", "upgrade")
    assert_one_error_line(cli(env, tmp_path, "submit", str(tmp_path / "in.jsonl"), "--quiet"),
                          mentions="message signing: cannot read")
