"""`pipeline serve`: an OpenAI-compatible Batch API (`/v1/files`, `/v1/batches`) for the official
`openai` SDK, per tenant, with API keys.

A surface, beside the CLI: it calls the pipeline's core (submit, export, control) and the database's
repository functions; nothing below it imports it. Every request names its tenant through its key,
and every lookup is scoped to that tenant, so another tenant's id is answered exactly as an id
that does not exist (404).
"""
