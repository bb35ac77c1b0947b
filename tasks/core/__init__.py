"""Settings, exception types, the report model: what every stage shares."""
