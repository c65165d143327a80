"""ASGI entry point: ``daphne config.asgi:application`` serves HTTP and the WebSocket protocol."""

import gc
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django_asgi_app = get_asgi_application()

from gateway.routing import build_application  # noqa: E402  (Django must be set up first)

application = build_application(http_app=django_asgi_app)

# Everything loaded so far (Django, Channels, Twisted, the gateway's modules: ~100,000 objects) lives as long as the
# process: keep it out of the garbage collector's full collections. A burst leaves many survivors behind, full
# collections follow, and each walked every object in the process: pauses of ~80 ms for the whole web process (and
# for the bridge inside rungateway), the p99 at 1,000 msg/s with 50 clients after a saturated phase (bench/README.md).
gc.freeze()
