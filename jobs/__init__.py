"""Celery tasks: the only place that joins the database (`db/`) and the engine (`workers/`).

Tasks are thin: they take ids, call plain functions with explicit arguments and leave the results
in the database."""
