"""server.settings: defaults, environment, flags over environment, fail-fast validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.settings import Settings, build_parser


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(f"VITSERVE_{name.upper()}", raising=False)
    s = Settings()
    assert (s.host, s.port, s.model_repo) == ("127.0.0.1", 8000, Path("model_repo"))
    assert s.providers == ["CUDAExecutionProvider", "OpenVINOExecutionProvider", "CPUExecutionProvider"]
    assert s.admin_api_key is None and s.default_model is None
    assert s.decode_threads >= 2 and s.intra_op_threads >= 1


def test_environment_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITSERVE_PROVIDERS", "CPUExecutionProvider")
    monkeypatch.setenv("VITSERVE_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("VITSERVE_PORT", "9000")
    s = Settings.from_cli(["--port", "9100", "--max-queue-delay-ms", "2.5", "--log-level", "DEBUG"])
    assert s.providers == ["CPUExecutionProvider"]
    assert s.max_batch_size == 8 and s.port == 9100 and s.max_queue_delay_ms == 2.5
    assert s.log_level == "debug"


def test_the_admin_key_is_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITSERVE_ADMIN_API_KEY", "x" * 20)
    s = Settings()
    assert "x" * 20 not in repr(s) and "x" * 20 not in str(s.model_dump())
    assert s.admin_api_key.get_secret_value() == "x" * 20


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-batch-size", "0"], "--max-batch-size / VITSERVE_MAX_BATCH_SIZE"),
        (["--variant", "fp8"], "--variant / VITSERVE_VARIANT"),
        (["--providers", "CPU"], "CUDAExecutionProvider,CPUExecutionProvider"),
        (["--default-model", "../etc"], "no path characters"),
        (["--request-timeout-s", "-1"], "--request-timeout-s"),
    ],
)
def test_invalid_values_exit_2_naming_flag_and_variable(args, message, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        Settings.from_cli(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_a_file_is_not_a_repository(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        Settings(model_repo=f)


def test_every_field_has_a_flag_and_a_description() -> None:
    parser = build_parser()
    flags = {a.dest: a for a in parser._actions}
    for name, field in Settings.model_fields.items():
        assert name in flags and field.description
        assert f"VITSERVE_{name.upper()}" in flags[name].help


def test_the_readme_settings_table_lists_every_setting() -> None:
    readme = (Path(__file__).parents[3] / "README.md").read_text(encoding="utf-8")
    for name in Settings.model_fields:
        assert f"| `--{name.replace('_', '-')}` | `VITSERVE_{name.upper()}` |" in readme, name
