"""A call's arguments: JSON text from the model, checked against the tool's JSON Schema.

The model's text may be anything: not JSON, nested without end, not an object, missing a
required field. Each of those is a `ToolError` whose message goes back to the model as the
call's result (so it can correct itself), never an exception that ends the turn.
"""

from __future__ import annotations

from typing import Any, Final

import jsonschema
import msgspec
from jsonschema.exceptions import SchemaError

from protocol.jsondepth import MAX_DEPTH, too_deep
from server.tools.definitions import ToolError

MAX_REPORTED: Final = 3
"""Schema violations named in one error result."""


class BadSchema(ValueError):
    """A configured or listed tool schema that is not a valid JSON Schema."""


def checker(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    """A validator for the schema (its own `$schema` draft, else 2020-12), or BadSchema."""
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        raise BadSchema(exc.message) from None
    return cls(schema)


def parse(arguments: str) -> dict[str, Any]:
    """The arguments as an object; an empty text is `{}` (models send it for no arguments)."""
    if not arguments.strip():
        return {}
    if too_deep(arguments):
        raise ToolError(f"the arguments nest more than {MAX_DEPTH} levels deep")
    try:
        value = msgspec.json.decode(arguments)
    except msgspec.DecodeError as exc:
        raise ToolError(f"the arguments are not valid JSON: {exc}") from None
    except UnicodeError:  # a lone surrogate, which the stream's JSON let through
        raise ToolError("the arguments are not valid JSON: not valid Unicode") from None
    if not isinstance(value, dict):
        raise ToolError("the arguments must be a JSON object")
    return value


def validate(validator: jsonschema.protocols.Validator, arguments: dict[str, Any]) -> None:
    """ToolError naming the first few ways the arguments miss the schema."""
    errors = sorted(validator.iter_errors(arguments), key=lambda e: list(e.path))
    if not errors:
        return
    described = "; ".join(_describe(e) for e in errors[:MAX_REPORTED])
    more = f" (and {len(errors) - MAX_REPORTED} more)" if len(errors) > MAX_REPORTED else ""
    raise ToolError(f"the arguments do not match the tool's schema: {described}{more}")


def _describe(error: jsonschema.ValidationError) -> str:
    where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
    return f"{where}: {error.message[:200]}"
