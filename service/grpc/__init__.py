"""kipam's gRPC transport.

The ``kipam.v1`` server (:mod:`.server`), its error mapping (:mod:`.errors`), message
conversion (:mod:`.convert`) and the generated code (``gen``, from ``proto/kipam/v1`` by
``make proto``).
"""
