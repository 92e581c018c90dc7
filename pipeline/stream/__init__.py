"""The streaming product: sources -> sensor -> [recorder] -> batcher -> keyed classifier -> sinks."""
