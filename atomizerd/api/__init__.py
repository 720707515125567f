"""gRPC servicers: thin adapters between atomizer.v1 messages and the domain."""
