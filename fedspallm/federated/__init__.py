"""The federation: server-side sampling and aggregation (pure functions), clients and rounds."""
