"""`eanet compare`: `config` (CompareConfig), `run` (train, resume or skip), `report`, `plots`."""
