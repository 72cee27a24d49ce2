"""The system of record: stores, migrations, the journal, the group-commit writer."""
