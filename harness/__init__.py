"""The measuring harness: cases, inputs, checks, timing, memory, compile time, records."""
