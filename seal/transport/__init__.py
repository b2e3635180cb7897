"""The core's transport modules: proto conversions (``convert``) and the pipeline's ports over
gRPC (``ports``). Only modules here, ``seal.rpc`` and the launchers (``seal.cli``, ``seal.stack``)
may import ``grpc``; the import contract in ``tests/test_import_contract.py`` checks it."""
