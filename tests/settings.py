"""Test settings: the real settings module, with test defaults put in the environment first."""

import os
import tempfile
from pathlib import Path

os.environ.setdefault("DJANGO_SECRET_KEY", "tests-only-not-secret")
os.environ.setdefault("GATEWAY_ENV_FILE", "/nonexistent")  # a developer's .env must not leak into tests
_tmp = Path(os.environ.setdefault("GATEWAY_TEST_DIR", tempfile.mkdtemp(prefix="gateway-tests-")))

from config.settings import *  # noqa: E402,F403
from config.settings import DATABASES  # noqa: E402

if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # A file, not :memory:, so that subprocesses (Daphne, bridges) in the tests can share it.
    DATABASES["default"]["TEST"] = {"NAME": str(_tmp / "test.sqlite3")}

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
