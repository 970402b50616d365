"""Alembic migration scripts (an installed package, so a wheel install can migrate)."""
