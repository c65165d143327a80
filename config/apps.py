from django.apps import AppConfig


class ConfigConfig(AppConfig):
    """Registered so that the composition root can own the ``rungateway`` command."""

    name = "config"
    label = "gateway_config"
    verbose_name = "Gateway configuration"
