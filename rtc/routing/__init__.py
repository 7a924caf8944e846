"""The routing layer of a worker, cut along its seams.

Pure pieces (`records`, `hub`, `channels`, `checkpoint`) take values and return values;
the adapters around them (`ring`, `outbox`, `sequencer`, `forwarder`, `delivery`,
`presence`, `sessions`) do the I/O through narrow broker protocols. `rtc.node` wires
them together; nothing here imports it.
"""
