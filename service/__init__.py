"""kipam's running program: configuration, store, locks, use cases, APIs and the CLI."""
