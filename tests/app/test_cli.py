"""``ragloom keys`` and ``ragloom serve``'s refusal to run without auth off loopback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli import app as cli
from app.cli.serve import check_bind, is_loopback


@pytest.fixture()
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("RAGLOOM_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("RAGLOOM_API__DATABASE_URL", raising=False)
    return CliRunner()


def test_keys_create_list_revoke(runner: CliRunner, tmp_path: Path) -> None:
    from app.auth import authenticate
    from app.db import Database
    from app.errors import ApiError

    created = runner.invoke(cli, ["keys", "create", "--tenant", "acme", "--name", "bot"])
    assert created.exit_code == 0, created.output
    key = re.search(r"key: (\S+)", created.output)
    key_id = re.search(r"id: (\S+)", created.output)
    assert key and key_id
    listed = runner.invoke(cli, ["keys", "list"])
    assert key_id.group(1) in listed.output and "acme" in listed.output
    assert key.group(1) not in listed.output  # the secret is never listed
    db = Database(f"sqlite:///{tmp_path / 'api.sqlite'}")
    assert authenticate(db, key.group(1)).tenant == "acme"
    assert runner.invoke(cli, ["keys", "revoke", key_id.group(1)]).exit_code == 0
    with pytest.raises(ApiError) as err:
        authenticate(db, key.group(1))
    assert err.value.status == 401 and err.value.code == "api_key_revoked"
    missing = runner.invoke(cli, ["keys", "revoke", "nope"])
    assert missing.exit_code == 1 and "no API key with id 'nope'" in missing.output
    bad = runner.invoke(cli, ["keys", "create", "--tenant", "Bad Name"])
    assert bad.exit_code == 1 and "invalid tenant" in bad.output


def test_serve_refuses_auth_off_on_public_address(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAGLOOM_API__AUTH", "off")
    result = runner.invoke(cli, ["serve", "--host", "0.0.0.0", "--port", "8123"])
    assert result.exit_code == 1 and "refusing to serve on 0.0.0.0" in result.output
    assert check_bind("127.0.0.1", "off") is None
    assert check_bind("::1", "off") is None
    assert check_bind("0.0.0.0", "on") is None
    assert is_loopback("localhost") and not is_loopback("10.0.0.1")


@pytest.mark.parametrize("flag", ["--prefill-chunk", "--idle-prefill-chunk"])
def test_engine_serve_rejects_a_prefill_budget_below_one(runner: CliRunner, flag: str) -> None:
    result = runner.invoke(cli, ["engine", "serve", "--model", "missing.gguf", flag, "0"])
    assert result.exit_code == 1
    assert f"{flag} must be >= 1, got 0" in result.output
    assert "Traceback" not in result.output
