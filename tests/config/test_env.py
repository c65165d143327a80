"""config.env: typed configuration getters whose errors name the variable, and URL parsing (contract section 7)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from config.env import Env, MqttUrl, database_config, mqtt_url, read_credentials, read_dotenv, redis_url

BASE = Path("/srv/gateway")


def env(**values):
    return Env(values)


# --- read_dotenv --------------------------------------------------------------------------------------------


def test_read_dotenv_parses_keys_comments_quotes_and_export(tmp_path):
    path = tmp_path / ".env"
    path.write_text(
        "# a comment\n"
        "\n"
        "PLAIN=value\n"
        "  SPACED = padded  \n"
        "export EXPORTED=1\n"
        'DOUBLE="with spaces # not a comment"\n'
        "SINGLE='x=y'\n"
        "EMPTY=\n"
        "URL=postgres://u:p@h/db?sslmode=require\n"
        "MISMATCHED='abc\"\n",
        encoding="utf-8",
    )
    assert read_dotenv(path) == {
        "PLAIN": "value",
        "SPACED": "padded",
        "EXPORTED": "1",
        "DOUBLE": "with spaces # not a comment",
        "SINGLE": "x=y",
        "EMPTY": "",
        "URL": "postgres://u:p@h/db?sslmode=require",
        "MISMATCHED": "'abc\"",
    }


def test_read_dotenv_missing_file_is_empty(tmp_path):
    assert read_dotenv(tmp_path / "nope.env") == {}


@pytest.mark.parametrize("line", ["JUST_A_NAME", "1BAD=x", "BAD-NAME=x", "=value", "two words=x"])
def test_read_dotenv_malformed_line_names_file_and_line(tmp_path, line):
    path = tmp_path / ".env"
    path.write_text(f"OK=1\n{line}\n", encoding="utf-8")
    with pytest.raises(ImproperlyConfigured, match=r"\.env:2: expected KEY=value"):
        read_dotenv(path)


def test_environment_wins_over_dotenv():
    merged = Env({"A": "from-env"}, {"A": "from-file", "B": "file-only"})
    assert (merged.str("A"), merged.str("B")) == ("from-env", "file-only")


def test_load_reads_the_file_named_by_gateway_env_file(tmp_path, monkeypatch):
    path = tmp_path / "custom.env"
    path.write_text("GATEWAY_TEST_ONLY_VALUE=42\n", encoding="utf-8")
    monkeypatch.setenv("GATEWAY_ENV_FILE", str(path))
    monkeypatch.delenv("GATEWAY_TEST_ONLY_VALUE", raising=False)
    assert Env.load(tmp_path).int("GATEWAY_TEST_ONLY_VALUE", 0) == 42


def test_credentials_sit_between_the_environment_and_the_dotenv_file(tmp_path, monkeypatch):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "GATEWAY_TEST_SECRET").write_text("from-credential\n", encoding="utf-8")
    (credentials / "GATEWAY_TEST_BOTH").write_text("from-credential", encoding="utf-8")
    dotenv = tmp_path / "gateway.env"
    dotenv.write_text("GATEWAY_TEST_SECRET=from-file\nGATEWAY_TEST_BOTH=from-file\n", encoding="utf-8")
    monkeypatch.setenv("GATEWAY_ENV_FILE", str(dotenv))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    monkeypatch.delenv("GATEWAY_TEST_SECRET", raising=False)
    monkeypatch.setenv("GATEWAY_TEST_BOTH", "from-env")
    loaded = Env.load(tmp_path)
    assert loaded.str("GATEWAY_TEST_SECRET") == "from-credential"  # one trailing newline dropped
    assert loaded.str("GATEWAY_TEST_BOTH") == "from-env"


def test_credentials_directory_that_is_missing_names_itself(tmp_path):
    with pytest.raises(ImproperlyConfigured, match=r"CREDENTIALS_DIRECTORY=.*nowhere"):
        read_credentials(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:9101", ("127.0.0.1", 9101)), ("[::1]:80", ("::1", 80)), ("", None), ("  ", None)],
)
def test_bind(text, expected):
    assert env(GATEWAY_METRICS_BIND=text).bind("GATEWAY_METRICS_BIND") == expected
    assert env().bind("GATEWAY_METRICS_BIND") is None


@pytest.mark.parametrize("text", ["9101", "host:", ":9101", "host:0", "host:70000", "host:port"])
def test_bind_errors_name_the_variable(text):
    with pytest.raises(ImproperlyConfigured, match=re.escape(f"GATEWAY_METRICS_BIND={text!r}")):
        env(GATEWAY_METRICS_BIND=text).bind("GATEWAY_METRICS_BIND")


# --- getters ------------------------------------------------------------------------------------------------


def test_str_and_raw():
    values = env(NAME="x", EMPTY="")
    assert values.str("NAME") == "x"
    assert values.str("EMPTY", "default") == ""
    assert values.str("MISSING", "default") == "default"
    assert values.raw("MISSING") is None
    assert values.raw("NAME") == "x"


def test_required_str_names_the_variable():
    with pytest.raises(ImproperlyConfigured, match=r"^DJANGO_SECRET_KEY is required but not set$"):
        env().str("DJANGO_SECRET_KEY")


@pytest.mark.parametrize("text", ["1", "true", "TRUE", "Yes", "on", " true "])
def test_bool_true(text):
    assert env(FLAG=text).bool("FLAG", False) is True


@pytest.mark.parametrize("text", ["0", "false", "False", "no", "OFF", ""])
def test_bool_false(text):
    assert env(FLAG=text).bool("FLAG", True) is False


def test_bool_default_when_unset():
    assert env().bool("FLAG", True) is True
    assert env().bool("FLAG", False) is False


def test_bool_error_names_the_variable_and_value():
    with pytest.raises(ImproperlyConfigured, match=r"^DJANGO_DEBUG='maybe' is not a boolean"):
        env(DJANGO_DEBUG="maybe").bool("DJANGO_DEBUG", False)


def test_int_parses_and_defaults():
    assert env(N=" 42 ").int("N", 1) == 42
    assert env(N="-3").int("N", 1) == -3
    assert env(N="").int("N", 7) == 7
    assert env().int("N", 7) == 7


def test_int_bounds_are_inclusive():
    assert env(N="10").int("N", 1, minimum=10, maximum=10) == 10


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("abc", r"^GATEWAY_MAX_PAYLOAD='abc' is not an integer$"),
        ("1.5", r"^GATEWAY_MAX_PAYLOAD='1.5' is not an integer$"),
        ("63", r"^GATEWAY_MAX_PAYLOAD=63 is below the minimum 64$"),
        ("100000", r"^GATEWAY_MAX_PAYLOAD=100000 is above the maximum 65536$"),
    ],
)
def test_int_errors_name_the_variable(text, message):
    with pytest.raises(ImproperlyConfigured, match=message):
        env(GATEWAY_MAX_PAYLOAD=text).int("GATEWAY_MAX_PAYLOAD", 1024, minimum=64, maximum=65536)


def test_float_parses_and_defaults():
    assert env(F="2.5").float("F", 1.0) == 2.5
    assert env(F="0").float("F", 1.0) == 0.0
    assert env(F=" ").float("F", 1.0) == 1.0
    assert env().float("F", 1.0) == 1.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("fast", r"^GATEWAY_BATCH_LINGER_MS='fast' is not a number$"),
        ("-1", r"^GATEWAY_BATCH_LINGER_MS=-1.0 is below the minimum 0.0$"),
        ("nan", r"^GATEWAY_BATCH_LINGER_MS='nan' is not a finite number$"),
        ("inf", r"^GATEWAY_BATCH_LINGER_MS='inf' is not a finite number$"),
        ("-Infinity", r"^GATEWAY_BATCH_LINGER_MS='-Infinity' is not a finite number$"),
    ],
)
def test_float_errors_name_the_variable(text, message):
    with pytest.raises(ImproperlyConfigured, match=message):
        env(GATEWAY_BATCH_LINGER_MS=text).float("GATEWAY_BATCH_LINGER_MS", 5.0)


def test_float_minimum():
    with pytest.raises(ImproperlyConfigured, match=r"^HB=0.05 is below the minimum 0.1$"):
        env(HB="0.05").float("HB", 5.0, minimum=0.1)


def test_list():
    assert env(HOSTS="a.example, b.example,,  ").list("HOSTS", ["x"]) == ["a.example", "b.example"]
    assert env(HOSTS="").list("HOSTS", ["x"]) == []
    assert env().list("HOSTS", ["x"]) == ["x"]


def test_choice():
    assert env(MQTT_PROTOCOL=" 3.1.1 ").choice("MQTT_PROTOCOL", "5", ("5", "3.1.1")) == "3.1.1"
    assert env().choice("MQTT_PROTOCOL", "5", ("5", "3.1.1")) == "5"
    with pytest.raises(ImproperlyConfigured, match=r"^MQTT_PROTOCOL='4' is not one of 5, 3.1.1$"):
        env(MQTT_PROTOCOL="4").choice("MQTT_PROTOCOL", "5", ("5", "3.1.1"))


# --- DATABASE_URL -------------------------------------------------------------------------------------------


def test_sqlite_relative_path_is_under_base_dir():
    config = database_config("sqlite:///db.sqlite3", base_dir=BASE)
    assert config["ENGINE"] == "django.db.backends.sqlite3"
    assert config["NAME"] == "/srv/gateway/db.sqlite3"


def test_sqlite_relative_path_with_directories():
    assert database_config("sqlite:///var/db.sqlite3", base_dir=BASE)["NAME"] == "/srv/gateway/var/db.sqlite3"


def test_sqlite_absolute_path_has_four_slashes():
    assert database_config("sqlite:////var/lib/gateway/db.sqlite3", base_dir=BASE)["NAME"] == (
        "/var/lib/gateway/db.sqlite3"
    )


def test_sqlite_path_is_unquoted():
    assert database_config("sqlite:///my%20db.sqlite3", base_dir=BASE)["NAME"] == "/srv/gateway/my db.sqlite3"


def test_sqlite_serializes_writers_for_id_order():
    options = database_config("sqlite:///db.sqlite3", base_dir=BASE)["OPTIONS"]
    assert options["transaction_mode"] == "IMMEDIATE"
    assert "journal_mode=WAL" in options["init_command"]


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///"])
def test_sqlite_without_a_file_is_refused(url):
    with pytest.raises(ImproperlyConfigured, match=r"^DATABASE_URL=.* names no SQLite file$"):
        database_config(url, base_dir=BASE)


@pytest.mark.parametrize("scheme", ["postgres", "postgresql", "pgsql"])
def test_postgres_url(scheme):
    config = database_config(f"{scheme}://gw:s%40cret@db.example:5433/gateway?sslmode=require", base_dir=BASE)
    assert config["ENGINE"] == "django.db.backends.postgresql"
    assert (config["NAME"], config["USER"], config["PASSWORD"]) == ("gateway", "gw", "s@cret")
    assert (config["HOST"], config["PORT"]) == ("db.example", "5433")
    assert config["OPTIONS"] == {"sslmode": "require"}


def test_postgres_defaults_for_host_port_and_credentials():
    config = database_config("postgres:///gateway", base_dir=BASE)
    assert (config["NAME"], config["USER"], config["PASSWORD"], config["HOST"], config["PORT"]) == (
        "gateway",
        "",
        "",
        "",
        "",
    )


def test_postgres_without_a_database_is_refused_and_redacted():
    with pytest.raises(ImproperlyConfigured, match="names no database") as info:
        database_config("postgres://gw:topsecret@db/", base_dir=BASE)
    assert "topsecret" not in str(info.value)
    assert str(info.value).startswith("DATABASE_URL='postgres://gw:***@db/'")


@pytest.mark.parametrize("port", ["abc", "99999"])
def test_postgres_bad_port_is_a_configuration_error(port):
    with pytest.raises(ImproperlyConfigured, match=r"^DATABASE_URL=.*port") as info:
        database_config(f"postgres://gw:topsecret@db:{port}/gateway", base_dir=BASE)
    assert "topsecret" not in str(info.value)


@pytest.mark.parametrize("url", ["mysql://u:p@h/db", "db.sqlite3", "", "http://x/y"])
def test_unknown_database_scheme_is_refused(url):
    with pytest.raises(ImproperlyConfigured, match=r"scheme must be sqlite:// or postgres://"):
        database_config(url, base_dir=BASE)


def test_database_errors_use_the_given_variable_name():
    with pytest.raises(ImproperlyConfigured, match=r"^OTHER_DB="):
        database_config("mysql://h/db", name="OTHER_DB", base_dir=BASE)


# --- MQTT_URL -----------------------------------------------------------------------------------------------


def test_mqtt_url_defaults_to_1883():
    assert mqtt_url("mqtt://broker.local") == MqttUrl("broker.local", 1883, False, None, None)


def test_mqtts_url_defaults_to_8883_with_tls():
    assert mqtt_url("mqtts://broker.local") == MqttUrl("broker.local", 8883, True, None, None)


def test_mqtt_url_with_credentials_and_port():
    parsed = mqtt_url("mqtt://gw:p%40ss%3Aword@10.0.0.5:11883")
    assert parsed == MqttUrl("10.0.0.5", 11883, False, "gw", "p@ss:word")
    assert parsed.display() == "mqtt://gw@10.0.0.5:11883"
    assert "p@ss" not in parsed.display()


def test_mqtt_url_with_user_only():
    assert mqtt_url("mqtts://gw@h:8884") == MqttUrl("h", 8884, True, "gw", None)


def test_mqtt_url_ipv6_host():
    assert mqtt_url("mqtt://[::1]:1884") == MqttUrl("::1", 1884, False, None, None)


@pytest.mark.parametrize(
    "url",
    ["tcp://broker:1883", "http://broker", "broker:1883", "", "ws://broker/mqtt", "mqtt+ssl://broker"],
)
def test_mqtt_url_bad_scheme(url):
    with pytest.raises(ImproperlyConfigured, match=r"^MQTT_URL=.*scheme must be mqtt:// or mqtts://$"):
        mqtt_url(url)


@pytest.mark.parametrize("port", ["abc", "65536", "99999", "0", "-1"])
def test_mqtt_url_bad_port(port):
    with pytest.raises(ImproperlyConfigured, match=r"^MQTT_URL=.*port is not a number from 1 to 65535$") as info:
        mqtt_url(f"mqtt://gw:topsecret@broker:{port}")
    assert "topsecret" not in str(info.value)


def test_mqtt_url_without_host():
    with pytest.raises(ImproperlyConfigured, match=r"^MQTT_URL='mqtt://:1883' names no host$"):
        mqtt_url("mqtt://:1883")


def test_mqtt_url_bad_scheme_is_redacted():
    with pytest.raises(ImproperlyConfigured) as info:
        mqtt_url("tcp://gw:topsecret@broker")
    assert "topsecret" not in str(info.value)
    assert "gw:***@broker" in str(info.value)


def test_mqtt_url_errors_use_the_given_variable_name():
    with pytest.raises(ImproperlyConfigured, match=r"^OTHER_BROKER="):
        mqtt_url("tcp://x", name="OTHER_BROKER")


# --- REDIS_URL ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["redis://localhost:6379/0", "rediss://:pw@redis.example:6380/1", "unix:///run/redis.sock"]
)
def test_redis_url_is_returned_unchanged(url):
    assert redis_url(url) == url


@pytest.mark.parametrize("url", ["http://redis", "localhost:6379", "", "memory://"])
def test_redis_url_bad_scheme(url):
    with pytest.raises(ImproperlyConfigured, match=r"^REDIS_URL=.*scheme must be redis://, rediss:// or unix://$"):
        redis_url(url)


def test_redis_url_error_is_redacted():
    with pytest.raises(ImproperlyConfigured) as info:
        redis_url("http://u:topsecret@redis:6379")
    assert "topsecret" not in str(info.value)
