"""The HTTP layer: routes that translate between HTTP and the engine, their dependencies and errors."""
