"""The generate command's output constraints (--json, --json-schema FILE) as an OpenAI response_format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


def response_format(json_object: bool, json_schema: Path | None) -> dict[str, Any] | None:
    """{"type": "json_object"} for --json, {"type": "json_schema", ...} for --json-schema FILE, else None."""
    if json_object and json_schema is not None:
        raise click.UsageError("give --json or --json-schema, not both")
    if json_object:
        return {"type": "json_object"}
    if json_schema is None:
        return None
    try:
        schema = json.loads(json_schema.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise click.ClickException(f"{json_schema} is not a JSON file ({e}): pass a JSON schema") from None
    if not isinstance(schema, dict):
        raise click.ClickException(f"{json_schema} holds a {type(schema).__name__}, not a JSON schema object")
    return {
        "type": "json_schema",
        "json_schema": {"name": json_schema.stem, "schema": schema, "strict": True},
    }
