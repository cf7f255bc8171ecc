"""kipam's REST API (Litestar) for people and scripts: ``/v1``, health, OpenAPI."""
