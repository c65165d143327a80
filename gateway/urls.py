from django.contrib.auth import views as auth_views
from django.urls import include, path

from gateway import views
from gateway.api.app import API_NAMESPACE
from gateway.api.app import urlpatterns as api_urlpatterns

urlpatterns = [
    path("", views.fleet, name="fleet"),
    path("devices/<str:device_id>/", views.device, name="device"),
    path("console/state.json", views.state, name="state"),
    path("login/", auth_views.LoginView.as_view(template_name="gateway/login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("metrics", views.metrics, name="metrics"),
    path("api/", include((api_urlpatterns(), "ninja"), namespace=API_NAMESPACE)),
]
