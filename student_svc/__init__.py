"""gRPC entry point of the student: thin wrapper over ``seal.student.Student``."""
