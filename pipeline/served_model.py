"""The model a job's lines are answered by, and the other names a line may call it by.

A worker serves one model (`Settings.model`). A request line may name its model (`model` on a
simple line, `body.model` on an OpenAI line); a name that is neither the job's model nor one of
`Settings.model_aliases` is refused at submit with `model_not_found`, as OpenAI refuses a model it
does not serve, rather than answered by another model without a word.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ServedModel:
    """`name`: the model that answers (the job's model); `aliases`: other names that mean it."""

    name: str
    aliases: tuple[str, ...] = ()

    @classmethod
    def for_job(cls, requested: str | None, settings_model: str, aliases: tuple[str, ...]) -> ServedModel:
        """The model of a job submitted with `--model requested` (None: the settings' model). An
        alias stands for the settings' model; the aliases hold only for a job of that model."""
        name = settings_model if requested is None or requested in aliases else requested
        return cls(name, aliases if name == settings_model else ())

    def resolve(self, requested: str) -> str | None:
        """The served name for a line's `requested` model, or None when it is not served here."""
        return self.name if requested == self.name or requested in self.aliases else None
