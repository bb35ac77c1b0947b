"""radflow Prefect flows and the ``radflow`` command line."""
