"""Django settings. Every value that varies between deployments comes from ``config.env``."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path
from typing import Any, TypedDict

import django_stubs_ext
from django.core.exceptions import ImproperlyConfigured

from config.env import Env, database_config, mqtt_url, redis_url
from gateway.events import GROUP_EXPIRY
from mqtt_bridge.topics import validate_prefix, validate_shared_group

django_stubs_ext.monkeypatch()  # lets ModelAdmin[Device] and friends be subscripted at run time

BASE_DIR = Path(__file__).resolve().parent.parent
env = Env.load(BASE_DIR)

DEBUG = env.bool("DJANGO_DEBUG", False)
SECRET_KEY = env.str("DJANGO_SECRET_KEY", "") or ""
if not SECRET_KEY:
    raise ImproperlyConfigured(
        "DJANGO_SECRET_KEY is required but not set (the quick start writes one to .env; "
        "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(50))')"
    )
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "ninja",  # the API docs at /api/docs: Swagger UI from our own static files, not a CDN (CSP 'self')
    "devices",
    "mqtt_bridge",
    "gateway",
    "config.apps.ConfigConfig",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "gateway.security.SecurityHeadersMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {"default": database_config(env.str("DATABASE_URL", "sqlite:///db.sqlite3"), base_dir=BASE_DIR)}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "fleet"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# --- HTTP security ------------------------------------------------------------------------------------------------
# DJANGO_HTTPS: the console is served over HTTPS (directly, or behind a TLS proxy that sets X-Forwarded-Proto).
HTTPS = env.bool("DJANGO_HTTPS", False)
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = HTTPS
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
SECURE_HSTS_SECONDS = 31_536_000 if HTTPS else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = HTTPS
# Preloading is the domain owner's call (leaving the browsers' list takes months), so it is opt-in; without it
# `check --deploy` would warn (security.W021) about a decision this project cannot make for its users.
SECURE_HSTS_PRELOAD = HTTPS and env.bool("DJANGO_HSTS_PRELOAD", False)
SILENCED_SYSTEM_CHECKS = [] if SECURE_HSTS_PRELOAD else ["security.W021"]
SECURE_SSL_REDIRECT = HTTPS
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]  # probes and scrapers speak plain HTTP
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if HTTPS else None
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"

STATIC_URL = "static/"
STATIC_ROOT = Path(env.str("DJANGO_STATIC_ROOT", str(BASE_DIR / "staticfiles")))

# --- Channel layer: in-memory for one process, Redis when several processes share events -----------------
REDIS_URL = env.raw("REDIS_URL") or None
CHANNEL_LAYERS: dict[str, Any]
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                # socket_timeout None: redis-py 8 defaults it to the same 5 s as the layer's BZPOPMIN wait, and an
                # idle receiver then dies with TimeoutError (redis-py issue 4091).
                "hosts": [{"address": redis_url(REDIS_URL), "socket_timeout": None}],
                "capacity": env.int("GATEWAY_LAYER_CAPACITY", 1000, minimum=10),
                "expiry": 60,
                # Members renew every GROUP_EXPIRY / 3 (gateway.events.keep_membership); a dead process's hub leaves
                # after this instead of a day, during which a minute of batches stays queued for it in Redis.
                "group_expiry": GROUP_EXPIRY,
            },
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels.layers.InMemoryChannelLayer",
            "CONFIG": {"capacity": env.int("GATEWAY_LAYER_CAPACITY", 1000, minimum=10), "expiry": 60},
        }
    }


class MqttSettings(TypedDict):
    """``settings.MQTT``: where and how the bridge connects (from MQTT_URL and friends)."""

    HOST: str
    PORT: int
    TLS: bool
    USERNAME: str | None
    PASSWORD: str | None
    DISPLAY_URL: str
    PROTOCOL: str
    CLIENT_ID: str
    KEEPALIVE: int
    SESSION_EXPIRY: int
    RECEIVE_MAXIMUM: int
    QUEUE_MAX: int


class GatewaySettings(TypedDict):
    """``settings.GATEWAY``: the gateway's own behaviour (contract sections 1, 4 and 7)."""

    TOPIC_PREFIX: str
    SHARED_GROUP: str | None
    MAX_PAYLOAD: int
    HISTORY_RETENTION_DAYS: int
    AUTO_REGISTER: bool
    MAX_DEVICES: int
    REPLAY_MAX: int
    BATCH_MAX: int
    BATCH_LINGER: float
    WS_QUEUE_MAX: int
    WS_FRAME_EVENTS: int
    WS_MAX_FRAME: int
    WS_STALL_TIMEOUT: float
    HEARTBEAT_INTERVAL: float
    COMMANDS_OFFLINE: str
    COMMAND_TIMEOUT: float
    COMMAND_POLL_INTERVAL: float
    COMMAND_LEASE: float
    WS_FRAMES_PER_SECOND: float
    WS_MAX_SUBSCRIPTIONS: int
    COMMANDS_PER_MINUTE: int
    ACCESS_REFRESH: float
    METRICS_BIND: tuple[str, int] | None
    STOP_TIMEOUT: float


# --- MQTT ----------------------------------------------------------------------------------------------------
_mqtt = mqtt_url(env.str("MQTT_URL", "mqtt://127.0.0.1:1883"))


def _default_client_id() -> str:
    subscriptions = f"{env.str('GATEWAY_TOPIC_PREFIX', 'devices')}|{env.raw('GATEWAY_MQTT_SHARED_GROUP') or ''}"
    return f"gateway-bridge-{socket.gethostname()}-{hashlib.sha256(subscriptions.encode()).hexdigest()[:8]}"


MQTT: MqttSettings = {
    "HOST": _mqtt.host,
    "PORT": _mqtt.port,
    "TLS": _mqtt.tls,
    "USERNAME": _mqtt.username,
    "PASSWORD": _mqtt.password,
    "DISPLAY_URL": _mqtt.display(),
    "PROTOCOL": env.choice("MQTT_PROTOCOL", "5", ("5", "3.1.1")),
    # The default names the host and the subscriptions: a persistent session keeps its subscriptions, so a bridge
    # whose prefix or shared group changed must not resume the old session (it would receive the old topics).
    "CLIENT_ID": env.str("GATEWAY_MQTT_CLIENT_ID", _default_client_id()),
    "KEEPALIVE": env.int("GATEWAY_MQTT_KEEPALIVE", 30, minimum=5, maximum=3600),
    "SESSION_EXPIRY": env.int("GATEWAY_MQTT_SESSION_EXPIRY", 3600, minimum=0),
    "RECEIVE_MAXIMUM": env.int("GATEWAY_MQTT_RECEIVE_MAXIMUM", 1000, minimum=1, maximum=65535),
    "QUEUE_MAX": env.int("GATEWAY_MQTT_QUEUE_MAX", 20000, minimum=100),
}


# --- Gateway behaviour (contract sections 1, 4 and 7) ----------------------------------------------------------
def _checked(name: str, value: str | None, check: Any) -> Any:
    try:
        return None if value is None else check(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}: {exc}") from None


_shared_group = _checked(
    "GATEWAY_MQTT_SHARED_GROUP", env.raw("GATEWAY_MQTT_SHARED_GROUP") or None, validate_shared_group
)
if _shared_group and MQTT["PROTOCOL"] != "5":
    raise ImproperlyConfigured("GATEWAY_MQTT_SHARED_GROUP needs MQTT_PROTOCOL=5 (no shared subscriptions on 3.1.1)")

GATEWAY: GatewaySettings = {
    "TOPIC_PREFIX": _checked("GATEWAY_TOPIC_PREFIX", env.str("GATEWAY_TOPIC_PREFIX", "devices"), validate_prefix),
    "SHARED_GROUP": _shared_group,
    "MAX_PAYLOAD": env.int("GATEWAY_MAX_PAYLOAD", 65536, minimum=64, maximum=16 * 1024 * 1024),
    "HISTORY_RETENTION_DAYS": env.int("GATEWAY_HISTORY_RETENTION_DAYS", 30, minimum=1),
    "AUTO_REGISTER": env.bool("GATEWAY_AUTO_REGISTER", True),
    "MAX_DEVICES": env.int("GATEWAY_MAX_DEVICES", 10000, minimum=1),
    "REPLAY_MAX": env.int("GATEWAY_REPLAY_MAX", 10000, minimum=1),
    "BATCH_MAX": env.int("GATEWAY_BATCH_MAX", 500, minimum=1, maximum=10000),
    "BATCH_LINGER": env.float("GATEWAY_BATCH_LINGER_MS", 5.0) / 1000.0,
    "WS_QUEUE_MAX": env.int("GATEWAY_WS_QUEUE_MAX", 5000, minimum=10),
    "WS_FRAME_EVENTS": env.int("GATEWAY_WS_FRAME_EVENTS", 500, minimum=1),
    # Above GATEWAY_MAX_PAYLOAD, so a command with the largest params still fits in one client frame.
    "WS_MAX_FRAME": env.int("GATEWAY_WS_MAX_FRAME", 131072, minimum=1024),
    # A client that reads nothing of what it was sent for this long is closed (its events wait in the feed meanwhile).
    "WS_STALL_TIMEOUT": env.float("GATEWAY_WS_STALL_TIMEOUT", 30.0, minimum=0.1),
    "HEARTBEAT_INTERVAL": env.float("GATEWAY_HEARTBEAT_INTERVAL", 5.0, minimum=0.1),
    # Commands for an offline device: "reject" at once, or "hold" until it is online or the deadline passes.
    "COMMANDS_OFFLINE": env.choice("GATEWAY_COMMANDS_OFFLINE", "reject", ("reject", "hold")),
    "COMMAND_TIMEOUT": env.float("GATEWAY_COMMAND_TIMEOUT", 30.0, minimum=1.0),
    "COMMAND_POLL_INTERVAL": env.float("GATEWAY_COMMAND_POLL_INTERVAL", 1.0, minimum=0.05),
    "COMMAND_LEASE": env.float("GATEWAY_COMMAND_LEASE", 10.0, minimum=1.0),
    # Abuse limits (contract section 6 and issue 5): per socket, per user.
    "WS_FRAMES_PER_SECOND": env.float("GATEWAY_WS_FRAMES_PER_SECOND", 20.0, minimum=1.0),
    "WS_MAX_SUBSCRIPTIONS": env.int("GATEWAY_WS_MAX_SUBSCRIPTIONS", 1000, minimum=1),
    "COMMANDS_PER_MINUTE": env.int("GATEWAY_COMMANDS_PER_MINUTE", 60, minimum=1),
    # How often open sockets re-check their user's grants and token (a change reaches them within 2x this).
    "ACCESS_REFRESH": env.float("GATEWAY_ACCESS_REFRESH", 2.0, minimum=0.1),
    # Where runbridge serves its Prometheus metrics (web processes serve theirs at /metrics).
    "METRICS_BIND": env.bind("GATEWAY_METRICS_BIND"),
    # How long runbridge may take after SIGTERM to store and acknowledge its batch before it gives up and exits 1
    # (what it had not acknowledged is redelivered); below the unit's TimeoutStopSec (30 s), so it is never SIGKILLed.
    "STOP_TIMEOUT": env.float("GATEWAY_STOP_TIMEOUT", 20.0, minimum=0.1),
}

# --- systemd: set by the service manager when runbridge runs as a Type=notify unit with a watchdog -------------
SYSTEMD: dict[str, str | None] = {
    "NOTIFY_SOCKET": env.raw("NOTIFY_SOCKET"),
    "WATCHDOG_USEC": env.raw("WATCHDOG_USEC"),
    "WATCHDOG_PID": env.raw("WATCHDOG_PID"),
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {
        "handlers": ["console"],
        "level": env.choice("GATEWAY_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")),
    },
    "loggers": {
        "amqtt": {"level": "WARNING"},
        "transitions": {"level": "WARNING"},
        "daphne": {"level": "WARNING"},
        "django.channels.server": {"level": "WARNING"},
    },
}
