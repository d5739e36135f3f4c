"""Helpers that know nothing of CT or models, used by every part: atomic, durable writes
(`atomic`) and keeping freed memory in the process (`allocator`)."""
