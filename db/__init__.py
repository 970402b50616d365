"""The database layer: typed models, engine and session factory, repository functions, migrations.

Imports neither torch nor Celery. Repository functions live in `db.repository`.
"""

from db.base import Base, utcnow
from db.enums import ChunkStatus, JobStatus, Priority, RequestStatus
from db.files import StoredFile
from db.models import Chunk, Job, Request
from db.records import ErrorEvent, JobUsage, SessionRecord
from db.session import make_engine, session_factory
from db.tenants import ApiKey, Tenant

__all__ = [
    "ApiKey",
    "Base",
    "Chunk",
    "ChunkStatus",
    "ErrorEvent",
    "Job",
    "JobStatus",
    "JobUsage",
    "Priority",
    "Request",
    "RequestStatus",
    "SessionRecord",
    "StoredFile",
    "Tenant",
    "make_engine",
    "session_factory",
    "utcnow",
]
