"""config/asgi.py: the web process's entry point."""

import gc

import config.asgi


def test_the_entry_point_keeps_what_it_loaded_out_of_full_garbage_collections():
    assert config.asgi.application is not None
    assert gc.get_freeze_count() > 10_000  # Django, Channels, Twisted and the gateway, frozen once loaded
