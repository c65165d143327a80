from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from devices import services


class Command(BaseCommand):
    help = "Create a console superuser with a generated password, printed once (nothing if it exists)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--username", default="operator")

    def handle(self, *args: Any, **options: Any) -> None:
        username = options["username"]
        password = services.ensure_operator(username=username)
        if password is None:
            self.stdout.write(
                f"Console user {username!r} exists (new password: python manage.py changepassword {username})"
            )
        else:
            self.stdout.write(f"Console user: {username}  password: {password}  (shown once; keep it)")
