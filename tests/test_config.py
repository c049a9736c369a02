"""Settings files: conf/procsched.toml builds a pool; mistakes name the key and the file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import procsched
from procsched.config import load_pool_settings
from procsched.model import PoolConfig

SHIPPED = Path(__file__).resolve().parent.parent / "conf" / "procsched.toml"


def square(x: int) -> int:
    return x * x


@pytest.mark.timeout(10)
def test_shipped_file_holds_the_defaults() -> None:
    settings = load_pool_settings(SHIPPED)
    defaults = PoolConfig()
    assert settings, "the shipped file should spell its settings out"
    for key, value in settings.items():
        assert value == getattr(defaults, key), key


@pytest.mark.timeout(30)
def test_pool_from_config_uses_file_and_overrides(tmp_path: Path) -> None:
    conf = tmp_path / "p.toml"
    conf.write_text("[pool]\nmax_workers = 1\nmax_tasks_per_child = 2\n")
    with procsched.Pool.from_config(conf) as pool:
        assert pool.max_workers == 1
        assert pool._config.max_tasks_per_child == 2
        assert pool.submit(square, 4).result(timeout=20) == 16
    with procsched.Pool.from_config(conf, max_workers=2) as pool:
        assert pool.max_workers == 2


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "text, words",
    [
        ("[pool]\nmax_worker = 2\n", ["max_worker"]),
        ("[pool]\nkill_grace = 'soon'\n", ["kill_grace", "float"]),
        ("[pools]\n", ["pools"]),
        ("[pool\n", ["TOML"]),
    ],
    ids=["unknown-key", "wrong-type", "unknown-table", "not-toml"],
)
def test_bad_file_names_key_and_file(tmp_path: Path, text: str, words: list[str]) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text(text)
    with pytest.raises(procsched.ConfigError) as info:
        procsched.Pool.from_config(conf)
    message = str(info.value)
    assert str(conf) in message
    for word in words:
        assert word in message


@pytest.mark.timeout(10)
def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(procsched.ConfigError, match="cannot read settings file"):
        load_pool_settings(os.path.join(tmp_path, "nope.toml"))


@pytest.mark.timeout(10)
def test_out_of_range_value_names_the_key(tmp_path: Path) -> None:
    conf = tmp_path / "neg.toml"
    conf.write_text("[pool]\nkill_grace = -1.0\n")
    with pytest.raises(ValueError, match="kill_grace"):
        procsched.Pool.from_config(conf)


@pytest.mark.timeout(30)
def test_journal_table_opens_a_journaled_pool(tmp_path: Path) -> None:
    journal = tmp_path / "jobs.journal"
    conf = tmp_path / "p.toml"
    conf.write_text(f'[pool]\nmax_workers = 1\n\n[journal]\npath = "{journal}"\nfsync = "always"\nkeep_results = 7\n')
    with procsched.Pool.from_config(conf) as pool:
        assert pool.options(key="k").submit(square, 5).result(timeout=20) == 25
        rec = pool._sup.rec
        assert rec is not None and rec.journal.config.fsync == "always" and rec.journal.config.keep_results == 7
    assert any(name.endswith(".seg") for name in os.listdir(journal))


@pytest.mark.timeout(10)
def test_journal_table_without_a_path_means_no_journal_and_is_still_checked(tmp_path: Path) -> None:
    conf = tmp_path / "p.toml"
    conf.write_text('[pool]\nmax_workers = 1\n\n[journal]\nfsync = "interval"\n')
    with procsched.Pool.from_config(conf) as pool:
        assert pool._sup.rec is None
    conf.write_text("[journal]\nfsynk = 1\n")
    with pytest.raises(procsched.ConfigError, match=r"fsynk.*p\.toml|p\.toml.*fsynk"):
        procsched.Pool.from_config(conf)
    conf.write_text('[journal]\nfsync = "sometimes"\n')
    with pytest.raises(procsched.ConfigError, match=r"\[journal\].*fsync"):
        procsched.Pool.from_config(conf)


@pytest.mark.timeout(10)
def test_bad_journal_options_name_the_option(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fsync_interval"):
        procsched.Pool(1, journal=procsched.JournalConfig(path=str(tmp_path / "j"), fsync_interval=0))
    with pytest.raises(TypeError, match="'journal'"):
        procsched.Pool(1, journal=42)  # type: ignore[arg-type]
