"""The CLI's commands, one module per group; `pipeline/cli.py` assembles them."""
