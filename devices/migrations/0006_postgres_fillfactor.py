"""PostgreSQL: leave half of each page of the rows ingest updates in place (devices, telemetry rollups) free.

Every stored batch updates the current hour's rollup of each metric it carries and the state of each device it
names. With full pages (the default fillfactor, 100) each update writes its new row version to another page and a
new entry in every index; with room on the page it is a heap-only (HOT) update that touches no index: the rollup
upsert of a 500-device batch took ~24 ms instead of ~16 (bench/README.md). Existing pages keep their layout until
they are rewritten (VACUUM FULL); new pages get the room. Nothing to do on SQLite.
"""

from django.db import migrations
from django.db.backends.base.schema import BaseDatabaseSchemaEditor
from django.db.migrations.state import StateApps

TABLES = ("devices_device", "devices_telemetryrollup")


def set_fillfactor(apps: StateApps, schema_editor: BaseDatabaseSchemaEditor, value: int | None = 50) -> None:
    if schema_editor.connection.vendor != "postgresql":
        return
    quote = schema_editor.quote_name
    for table in TABLES:
        setting = f"SET (fillfactor = {value})" if value else "RESET (fillfactor)"
        schema_editor.execute(f"ALTER TABLE {quote(table)} {setting}")


def reset_fillfactor(apps: StateApps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    set_fillfactor(apps, schema_editor, None)


class Migration(migrations.Migration):
    dependencies = [("devices", "0005_telemetry_rollup")]

    operations = [migrations.RunPython(set_fillfactor, reset_fillfactor, elidable=False)]
