"""``recmix-serve``: run the service with uvicorn.

Every setting of :class:`service.settings.Settings` is a flag (``model_dir`` -> ``--model-dir``),
generated from the settings themselves; a flag wins over its ``RECMIX_*`` environment variable.
"""

from __future__ import annotations

import argparse
import copy
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any, get_args

import uvicorn
from pydantic import SecretStr, ValidationError
from uvicorn.config import LOGGING_CONFIG

from service.settings import Settings


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recmix-serve",
        description="Serve every model of a model repository over HTTP. Each flag can also be "
        "set as the environment variable shown; flags win.",
    )
    for name, field in Settings.model_fields.items():
        env = f"RECMIX_{name.upper()}"
        help_text = f"{field.description} [{env}]"
        default = (
            field.default.get_secret_value()
            if isinstance(field.default, SecretStr)
            else (field.default)
        )
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
        if field.annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            choices = get_args(field.annotation)
            if choices and all(isinstance(c, str) for c in choices):
                kwargs["choices"] = choices
            else:
                kwargs["metavar"] = name.upper()
        # shown by the help formatter; SUPPRESS keeps unset flags out of the namespace
        kwargs["help"] += f" (default: {default})" if name != "api_key" else " (default: off)"
        parser.add_argument(_flag(name), dest=name, **kwargs)
    return parser


def settings_from_args(argv: Sequence[str] | None = None) -> Settings:
    """Settings from the environment, overridden by the flags given."""
    args = vars(build_parser().parse_args(argv))
    return Settings(**args)


class _Server(uvicorn.Server):
    """uvicorn's server, for which a graceful stop on SIGTERM is a normal exit (status 0)."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        # uvicorn re-raises a captured signal after shutting down, which would end the process
        # "killed by SIGTERM"; the shutdown it asked for has been done, so report success
        if sig == signal.SIGTERM and captured and captured[-1] == sig:
            captured.pop()


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging, with the service's own logger beside it (in every worker process)."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["recmix"] = {
        "handlers": ["default"],
        "level": level.upper(),
        "propagate": False,
    }
    return config


def access_log(settings: Settings) -> bool:
    """Whether uvicorn writes a line per request: off unless asked for, or at debug level.

    Writing the line took about 50 us of server CPU per /encode at 32 clients, 12 % of it;
    production servers leave it off by default (gunicorn) or offer to (``uvicorn
    --no-access-log``), and the request metrics count requests by endpoint, model and status.
    A ``Settings.access_log`` field, if defined, overrides the log level's choice.
    """
    return bool(getattr(settings, "access_log", settings.log_level == "debug"))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = settings_from_args(argv)
    except ValidationError as exc:
        print(f"recmix-serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "log_config": log_config(settings.log_level),
        "access_log": access_log(settings),
        "timeout_graceful_shutdown": settings.graceful_timeout,
        "proxy_headers": False,
        "server_header": False,
    }
    if settings.workers > 1:
        # each worker process builds its app from the environment: pass the flags on through it
        for name, value in settings.model_dump().items():
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if value is not None:
                os.environ[f"RECMIX_{name.upper()}"] = str(value)
        uvicorn.run("service.http.app:create_app", factory=True, workers=settings.workers, **common)
        return 0
    from service.http.app import create_app

    server = _Server(uvicorn.Config(create_app(settings), **common))
    server.run()
    return 0 if server.started else 3


if __name__ == "__main__":
    sys.exit(main())
