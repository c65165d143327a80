"""Project configuration and the composition root (``rungateway`` wires the web side and the bridge)."""
