"""The README's service section lists every setting, error code and metric the service has."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.http import errors as http_errors
from service.http.metrics import METRIC_NAMES
from service.model import errors
from service.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def service_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("<!-- section:service -->")
    end = text.index("<!-- section:", start + 1)
    return text[start:end]


def test_every_setting_is_documented(service_section: str) -> None:
    for name in Settings.model_fields:
        env, flag = f"`RECMIX_{name.upper()}`", f"`--{name.replace('_', '-')}`"
        assert f"| {env} | {flag} |" in service_section, name


def test_every_error_code_is_documented(service_section: str) -> None:
    codes = {
        cls.code
        for module in (errors, http_errors)
        for cls in vars(module).values()
        if isinstance(cls, type) and issubclass(cls, errors.RecmixError)
    }
    assert {"bad_request", "unauthorized", "model_not_found"} <= codes
    for code in codes - {"internal_error"}:
        assert f"`{code}`" in service_section, code


def test_every_metric_is_documented(service_section: str) -> None:
    for name in METRIC_NAMES:
        assert f"`{name}`" in service_section, name
