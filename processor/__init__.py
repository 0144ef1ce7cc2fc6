"""Processor: a Faust consumer group that captions image events in micro-batches."""
