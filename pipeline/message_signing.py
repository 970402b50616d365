"""Optional Celery message signing (Celery's `auth` serializer), for deployments whose Redis others
can reach.

What it protects against: anyone who can write to the broker (Redis) could otherwise put task
messages on the queues that every worker runs: `run_chunk` for any chunk id, beat's tasks (a
backup, a nightly run of any file the workers can read). With signing on, every process that
sends tasks (the CLI, `pipeline serve`, beat) signs each message with its private key, and workers
accept only messages signed by a certificate in `security_cert_store`; an unsigned or forged
message is refused and never runs.

What it does not: messages are signed, not encrypted (a Redis reader still sees them; they carry
ids, never prompts); a signed message can be replayed or deleted (`run_chunk` is idempotent, and the
lost-chunk sweep resends what was deleted); Redis itself still needs a password and TLS
(`rediss://`) against eavesdropping and tampering with anything else it holds.

Settings: `security_key_file`, `security_certificate_file`, `security_cert_store` (all or none).
It needs the `cryptography` package (`pip install 'llm-batch-pipeline[signing]'`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from celery import Celery

    from pipeline.settings import Settings


def sign_messages(app: Celery, settings: Settings) -> None:
    """Switch `app` to signed task messages when the settings name a key; a no-op otherwise."""
    if settings.security_key_file is None:
        return
    try:
        import cryptography  # noqa: F401 - Celery's auth serializer needs it
    except ImportError:
        raise ValueError("message signing (security_key_file) needs the cryptography package: "
                         "pip install 'llm-batch-pipeline[signing]'") from None
    app.conf.update(
        task_serializer="auth",
        accept_content=["auth"],  # workers run signed messages only
        security_key=settings.security_key_file,
        security_certificate=settings.security_certificate_file,
        security_cert_store=settings.security_cert_store,
        security_digest="sha256",
    )
    try:
        # Signed JSON inside (never pickle); results, events and remote control stay plain JSON.
        app.setup_security(allowed_serializers=["json"], serializer="json")
    except OSError as e:
        raise ValueError(f"message signing: cannot read {e.filename} ({e.strerror}); check security_key_file "
                         "and security_certificate_file") from None
