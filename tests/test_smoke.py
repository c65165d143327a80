def test_settings_load():
    from django.conf import settings

    assert settings.GATEWAY["TOPIC_PREFIX"] == "devices"
