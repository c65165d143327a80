from django.contrib.auth import views as auth_views
from django.urls import path

from gateway import api, views

urlpatterns = [
    path("", views.fleet, name="fleet"),
    path("devices/<str:device_id>/", views.device, name="device"),
    path("console/state.json", views.state, name="state"),
    path("login/", auth_views.LoginView.as_view(template_name="gateway/login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("metrics", views.metrics, name="metrics"),
    path("api/commands", api.commands, name="api-commands"),
    path("api/commands/<str:command_id>", api.command, name="api-command"),
    path("api/devices/<str:device_id>/commands", api.device_commands, name="api-device-commands"),
]
