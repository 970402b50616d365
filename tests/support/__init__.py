"""Support code shared by every test folder: the processes a test drives (`processes`), a clean
folder for in-process CLI tests (`workdir`) and the markers that say which tests need PostgreSQL,
Redis or worker processes (`markers`).

tests/conftest.py puts tests/ on `sys.path`, so any test imports `from support.processes import ...`.
"""
