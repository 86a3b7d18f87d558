"""SecAgg+ (Bell et al., CCS 2020) pieces both sides share: the ring arithmetic, the
cryptographic primitives (all from kept libraries) and the protocol's message keys.

The client stages live in ``fedslm.client.secagg``, the server's state machine in
``fedslm.server.secagg``; neither imports the other.
"""
