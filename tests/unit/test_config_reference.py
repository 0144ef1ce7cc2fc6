"""docs/configuration.md is generated from the settings classes; these tests keep the
committed page and the classes in step, and every setting explained."""

from __future__ import annotations

import enum
import inspect
from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from captionstream import config_reference, settings
from captionstream.config_reference import (
    OUTPUT,
    SECTIONS,
    all_fields,
    describe_default,
    describe_type,
    env_name,
    render,
)


def test_committed_page_is_current() -> None:
    committed = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
    assert committed == render(), "docs/configuration.md is stale: run `make docs`"


def test_every_settings_class_has_a_section() -> None:
    classes = {
        obj
        for obj in vars(settings).values()
        if inspect.isclass(obj)
        and issubclass(obj, BaseSettings)
        and obj.__module__ == settings.__name__
    }
    assert classes == {section.settings for section in SECTIONS}


def test_every_field_is_listed() -> None:
    page = render()
    for cls, name, field in all_fields():
        assert page.count(f"| `{env_name(cls, name, field)}` |") >= 1, (cls.__name__, name)


def test_every_field_has_a_description() -> None:
    missing = [
        f"{cls.__name__}.{name}"
        for cls, name, field in all_fields()
        if not (field.description or "").strip()
    ]
    assert not missing, f"settings without a description: {', '.join(missing)}"


class _Color(enum.StrEnum):
    RED = "red"
    BLUE = "blue"


class _Example(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EX_")

    mode: Literal["fast", "exact"] = "fast"
    color: _Color = _Color.BLUE
    token: SecretStr | None = None
    password: SecretStr = SecretStr("hunter2")
    no_password: SecretStr = SecretStr("")
    required: int
    cafile: Path | None = None
    hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    json_list: list[int] = [1, 2]
    threads: int | None = Field(default=None, ge=1, le=64)
    wait_s: float = 0.5
    ttl_s: float = 86400.0
    on: bool = False
    aliased: str = Field(default="", validation_alias="OTHER_NAME")


def _field(name: str) -> tuple[str, str, str]:
    field = _Example.model_fields[name]
    return env_name(_Example, name, field), describe_type(field), describe_default(field)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mode", ("EX_MODE", "one of `fast`, `exact`", "`fast`")),
        ("color", ("EX_COLOR", "one of `red`, `blue`", "`blue`")),
        ("token", ("EX_TOKEN", "secret", "unset")),
        ("password", ("EX_PASSWORD", "secret", "set (hidden)")),
        ("no_password", ("EX_NO_PASSWORD", "secret", "empty")),
        ("required", ("EX_REQUIRED", "integer", "required")),
        ("cafile", ("EX_CAFILE", "path", "unset")),
        ("hosts", ("EX_HOSTS", "comma-separated list of string", "empty")),
        ("json_list", ("EX_JSON_LIST", "JSON list of integer", "`1,2`")),
        ("threads", ("EX_THREADS", "integer, ≥ 1, ≤ 64", "unset")),
        ("wait_s", ("EX_WAIT_S", "number", "`0.5`")),
        ("ttl_s", ("EX_TTL_S", "number", "`86400`")),
        ("on", ("EX_ON", "boolean", "`false`")),
        ("aliased", ("OTHER_NAME", "string", "empty")),
    ],
)
def test_types_and_defaults(name: str, expected: tuple[str, str, str]) -> None:
    assert _field(name) == expected


def test_secret_values_never_appear() -> None:
    assert "hunter2" not in describe_default(_Example.model_fields["password"])


def test_cli_prints_the_page(capsys: pytest.CaptureFixture[str]) -> None:
    assert config_reference.main([]) == 0
    assert capsys.readouterr().out == render()
