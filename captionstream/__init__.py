"""captionstream: image captioning as a Kafka stream-processing pipeline.

This package holds what every component shares: settings, the Kafka client profile,
the embedded broker and the command line. The layers live in their own packages:
`schemas` (contracts), `ingest` (validation, blob store, submission), `processor`
(Faust + model) and `gateway` (HTTP/WebSocket).
"""

__version__ = "0.1.0"
