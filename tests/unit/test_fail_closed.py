"""Settings that fail closed: running open, malformed database URLs, secrets in logs."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from kied._backoff import Backoff
from kied.cli import configure_logging, secrets_of
from kied.errors import ConfigError
from kied.settings import check_exposure, is_loopback, load_settings

API = {"KIED_API_TOKEN": "api-token-0123456789"}
CALLBACK = {"KIED_CALLBACK_TOKEN": "callback-token-0123456789"}


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.0.2.7", False),
        ("kied.example.com", False),
        ("", False),
    ],
)
def test_loopback_is_this_machine_only(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("environ", "address", "says"),
    [
        (
            {},
            "0.0.0.0",
            "KIED_API_TOKEN: listening on 0.0.0.0 without an API token and without callback"
            " authentication (KIED_CALLBACK_TOKEN or KIE_WEBHOOK_HMAC_KEY); set them, or"
            " KIED_ALLOW_OPEN=1 to run open on purpose",
        ),
        (
            API,
            "192.0.2.7",
            "KIED_CALLBACK_TOKEN: listening on 192.0.2.7 without callback authentication"
            " (KIED_CALLBACK_TOKEN or KIE_WEBHOOK_HMAC_KEY); set it, or KIED_ALLOW_OPEN=1 to"
            " run open on purpose",
        ),
        (
            CALLBACK,
            "::",
            "KIED_API_TOKEN: listening on :: without an API token; set it, or"
            " KIED_ALLOW_OPEN=1 to run open on purpose",
        ),
        (
            {"KIE_WEBHOOK_HMAC_KEY": "hmac-key-0123456789"},
            "",
            "KIED_API_TOKEN: listening on the sockets systemd passed without an API token;"
            " set it, or KIED_ALLOW_OPEN=1 to run open on purpose",
        ),
    ],
)
def test_listening_beyond_loopback_without_auth_is_refused(environ, address, says):
    settings = load_settings(environ)
    with pytest.raises(ConfigError) as caught:
        check_exposure(settings, [address])
    assert str(caught.value) == says


def test_port_alone_binds_all_addresses_and_is_refused():
    settings = load_settings({"PORT": "10000"})
    with pytest.raises(ConfigError, match=r"^KIED_API_TOKEN: listening on 0\.0\.0\.0 "):
        check_exposure(settings, [settings.host])


def test_with_both_tokens_kied_listens_anywhere_and_says_nothing():
    for auth in (CALLBACK, {"KIE_WEBHOOK_HMAC_KEY": "hmac-key-0123456789"}):
        settings = load_settings({"PORT": "10000", **API, **auth})
        assert check_exposure(settings, ["0.0.0.0", "::"]) is None


def test_loopback_runs_open_with_a_warning():
    settings = load_settings({})
    warning = check_exposure(settings, ["127.0.0.1"])
    assert warning is not None
    assert warning.startswith("running open on loopback")


def test_a_loopback_and_an_open_socket_are_refused():
    settings = load_settings(API)
    with pytest.raises(ConfigError, match=r"^KIED_CALLBACK_TOKEN: listening on 0\.0\.0\.0 "):
        check_exposure(settings, ["127.0.0.1", "0.0.0.0"])


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_allow_open_says_open_is_meant(value):
    settings = load_settings({"PORT": "10000", "KIED_ALLOW_OPEN": value})
    assert settings.allow_open
    warning = check_exposure(settings, ["0.0.0.0"])
    assert warning is not None
    assert "KIED_ALLOW_OPEN=1" in warning


def test_allow_open_must_be_a_flag():
    assert not load_settings({"KIED_ALLOW_OPEN": "0"}).allow_open
    with pytest.raises(ConfigError, match=r"^KIED_ALLOW_OPEN: must be 1 or 0, not 'maybe'$"):
        load_settings({"KIED_ALLOW_OPEN": "maybe"})


def test_metrics_token_is_read_and_never_shown():
    settings = load_settings({"KIED_METRICS_TOKEN": " metrics-token-0123 "})
    assert settings.metrics_token == "metrics-token-0123"
    assert "metrics-token-0123" not in repr(settings)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (
            "postgresql://u:p@ss@host:x/db",
            "KIED_DATABASE_URL: has more than one @ before the host; write an @ in the user or"
            " password as %40 (postgresql://u:***@host:x/db)",
        ),
        (
            "postgresql://u:secret@host:x/db",
            "KIED_DATABASE_URL: has port 'x', not a number 1-65535 (postgresql://u:***@host:x/db)",
        ),
        (
            "postgres://u:secret@h1:5432,h2:99999/db",
            "KIED_DATABASE_URL: has port '99999', not a number 1-65535"
            " (postgres://u:***@h1:5432,h2:99999/db)",
        ),
        (
            "postgresql://[::1]:port/db",
            "KIED_DATABASE_URL: has port 'port', not a number 1-65535 (postgresql://[::1]:port/db)",
        ),
    ],
)
def test_a_malformed_postgres_url_is_refused_without_its_password(url, says):
    with pytest.raises(ConfigError) as caught:
        load_settings({"KIED_DATABASE_URL": url})
    assert str(caught.value) == says


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://kied:p%40ss@db.internal:5432/kied?sslmode=require",
        "postgresql://[::1]:5432/kied",
        "postgresql://h1:5432,h2/kied",
        "postgresql:///kied?host=/run/postgresql",
        "postgresql://db/kied",
    ],
)
def test_well_formed_postgres_urls_pass(url):
    assert load_settings({"KIED_DATABASE_URL": url}).store.url == url  # type: ignore[union-attr]


# ------------------------------------------------------------------------------- logging

SECRETS = {
    "KIED_API_TOKEN": "api-SECRET-1",
    "KIED_CALLBACK_TOKEN": "cb/SECRET+2",
    "KIE_WEBHOOK_HMAC_KEY": "hmac-SECRET-3",
    "KIE_API_KEY": "kie-SECRET-4",
    "KIED_METRICS_TOKEN": "metrics-SECRET-5",
    "KIED_WEBHOOK_URL": "https://hooks.example.com/kied",
    "KIED_WEBHOOK_SECRET": "whsec_c2VjcmV0LXdlYmhvb2sta2V5LTY=",
    "KIED_DATABASE_URL": "postgresql://kied:db%40SECRET-7@db.internal/kied",
}
SHOWN = [
    "api-SECRET-1",
    "cb/SECRET+2",
    "cb%2FSECRET%2B2",
    "hmac-SECRET-3",
    "kie-SECRET-4",
    "metrics-SECRET-5",
    "c2VjcmV0LXdlYmhvb2sta2V5LTY=",
    "db%40SECRET-7",
    "db@SECRET-7",
]


@pytest.fixture
def log_lines(capsys, monkeypatch):
    """Configure kied's logging onto stderr, captured; yields a reader of what was written."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield lambda: capsys.readouterr().err
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for name in ("httpx", "httpcore", "hpack", "h2", "h11"):
        logging.getLogger(name).setLevel(logging.NOTSET)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_secret_reaches_a_log_line_at_any_level(log_lines, log_format):
    settings = load_settings(SECRETS)
    configure_logging("DEBUG", log_format, secrets=secrets_of(settings))
    log = logging.getLogger("kied.test")
    for shown in SHOWN:
        log.debug("value %s in a line", shown)
        log.error("in an exception", exc_info=ValueError(f"failed with {shown}"))
    log.info("settings: %r", settings)
    text = log_lines()
    assert "***" in text
    for shown in SHOWN:
        assert shown not in text


def test_the_header_codecs_never_log_below_warning(log_lines):
    configure_logging("DEBUG", "text")
    for name in ("hpack", "hpack.hpack", "h2", "h11", "httpcore", "httpx"):
        logging.getLogger(name).debug("Decoded (b'authorization', b'Bearer api-SECRET-1')")
    assert "api-SECRET-1" not in log_lines()
    assert logging.getLogger("kied").isEnabledFor(logging.DEBUG)


def _raw_control(char: str) -> bool:
    code = ord(char)
    return code < 0x20 or 0x7F <= code <= 0x9F or 0xD800 <= code <= 0xDFFF


FORGED = "a\nb 2026-01-01 ERROR kied: forged\r\x1b[31mred\x9b\ud800\x00\x7f"


def test_text_lines_escape_control_characters(log_lines):
    configure_logging("INFO", "text")
    log = logging.getLogger("kied.intake")
    log.info("[KIE_CALLBACK] job %s", FORGED)
    try:
        raise ValueError(FORGED)
    except ValueError:
        log.exception("[GEN] failed for %s", FORGED)
    text = log_lines()
    lines = text.splitlines()
    # Two records: the first one line, the second its line and an indented traceback.
    assert len([line for line in lines if not line.startswith("  ")]) == 2
    assert r"job a\nb 2026-01-01 ERROR kied: forged\r\x1b[31mred\x9b\ud800\x00\x7f" in lines[0]
    for char in text:
        assert char in "\n\t" or not _raw_control(char), repr(char)


def test_json_lines_escape_control_characters(log_lines):
    import json

    configure_logging("INFO", "json")
    logging.getLogger("kied.intake").info("[KIE_CALLBACK] job %s", FORGED)
    (line,) = log_lines().splitlines()
    for char in line:
        assert not _raw_control(char), repr(char)
    assert json.loads(line)["message"] == f"[KIE_CALLBACK] job {FORGED}"


def test_secrets_of_names_every_secret_setting():
    settings = load_settings(SECRETS)
    found = secrets_of(settings)
    for secret in ("api-SECRET-1", "cb/SECRET+2", "kie-SECRET-4", "metrics-SECRET-5"):
        assert secret in found
    assert "db%40SECRET-7" in found
    assert "db@SECRET-7" in found
    bare = replace(settings, store=load_settings({}).store)
    assert not any("SECRET-7" in s for s in secrets_of(bare))


# ------------------------------------------------------------------------------- back-off


def test_backoff_doubles_to_its_cap_and_then_logs_once_a_minute():
    now = [0.0]
    backoff = Backoff(0.5, 30.0, clock=lambda: now[0])
    delays, logged = [], 0
    for _ in range(200):  # 200 failures: about an hour and a half at the cap
        delay, log = backoff.failed()
        delays.append(delay)
        logged += log
        now[0] += delay
    assert delays[:8] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    minutes = sum(delays) / 60
    # One line per step on the way up, then one a minute at most.
    assert logged <= 6 + minutes + 1
    assert logged >= minutes / 2
    backoff.succeeded()
    assert backoff.failed() == (0.5, True)


# --------------------------------------------------------------------- database errors


@pytest.mark.parametrize(
    ("message", "permanent"),
    [
        ('FATAL:  database "kied" does not exist', True),
        ('FATAL:  role "kied" does not exist', True),
        ('FATAL:  password authentication failed for user "kied"', True),
        ('FATAL:  no pg_hba.conf entry for host "192.0.2.7", user "kied", database "kied"', True),
        ('invalid integer value "x" for connection option "port"', True),
        ("Connection refused\n\tIs the server running on that host?", False),
        ("timeout expired", False),
        ("failed to resolve host 'db.internal': Name or service not known", False),
        ("FATAL:  the database system is starting up", False),
        ("FATAL:  sorry, too many clients already", False),
    ],
)
def test_a_server_refusing_for_good_is_told_from_one_that_may_come_back(message, permanent):
    psycopg = pytest.importorskip("psycopg")
    from kied.errors import StoreMisconfiguredError, StoreUnavailableError
    from kied.store._postgres import _store_error

    text = f'connection failed: connection to server at "127.0.0.1", port 5432 failed: {message}'
    error = _store_error(psycopg.OperationalError(text))
    assert isinstance(error, StoreUnavailableError)
    assert isinstance(error, StoreMisconfiguredError) is permanent
