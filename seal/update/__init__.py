"""Inner-loop weight updates that turn a self-edit into an adapter."""
