"""gRPC entry point of the teacher: the public Adapt RPC, over ``seal.teacher``."""
