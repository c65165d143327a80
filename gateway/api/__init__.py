"""The HTTP API under ``/api/``: ``app`` builds it; ``devices`` and ``commands`` hold its operations."""
