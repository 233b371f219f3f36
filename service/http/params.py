"""Query parameters, declared once: parsed and checked for the routes, and documented from the
same declaration in the OpenAPI schema."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from service.model.errors import InvalidParameter

_INTEGER = re.compile(r"[+-]?\d+")
_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE = frozenset({"0", "false", "f", "no", "n", "off"})


@dataclass(frozen=True)
class Param:
    """One query parameter: its type, default, bounds or choices, and description."""

    name: str
    type: Literal["integer", "boolean", "string"]
    description: str
    default: Any = None
    minimum: int | None = None
    choices: tuple[str, ...] = ()

    def parse(self, raw: str) -> Any:
        """The value of ``raw``, or ValueError with what is wrong with it."""
        if self.type == "integer":
            if not _INTEGER.fullmatch(raw.strip()):
                raise ValueError("Input should be a valid integer")
            value = int(raw)
            if self.minimum is not None and value < self.minimum:
                raise ValueError(f"Input should be greater than or equal to {self.minimum}")
            return value
        if self.type == "boolean":
            word = raw.strip().lower()
            if word in _TRUE:
                return True
            if word in _FALSE:
                return False
            raise ValueError("Input should be a valid boolean (true or false)")
        if self.choices and raw not in self.choices:
            raise ValueError("Input should be " + " or ".join(f"'{c}'" for c in self.choices))
        return raw

    def openapi(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": self.type}
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.choices:
            schema["enum"] = list(self.choices)
        if self.default is None:
            schema = {"anyOf": [schema, {"type": "null"}]}
        else:
            schema["default"] = self.default
        schema["title"] = self.name.replace("_", " ").title()
        schema["description"] = self.description
        return {
            "name": self.name,
            "in": "query",
            "required": False,
            "schema": schema,
            "description": self.description,
        }


MODEL = Param("model", "string", "model name (default: the server's default model)")
SEED = Param("seed", "integer", "random seed, for reproducible draws", minimum=0)


def parse_params(params: tuple[Param, ...], query: Mapping[str, str]) -> dict[str, Any]:
    """The endpoint's parameters from the query (unknown names are ignored), or a 422 naming
    every one that is wrong."""
    values: dict[str, Any] = {}
    problems: list[dict[str, str]] = []
    for param in params:
        raw = query.get(param.name)
        if raw is None:
            values[param.name] = param.default
            continue
        try:
            values[param.name] = param.parse(raw)
        except ValueError as exc:
            problems.append({"location": f"query.{param.name}", "message": str(exc)})
    if problems:
        summary = "; ".join(f"{p['location']}: {p['message']}" for p in problems)
        raise InvalidParameter(summary, problems=problems)
    return values
