"""Helpers that know nothing of CT or models, used by every part: atomic, durable writes
(`atomic`), writing past the page cache (`direct_io`) and keeping freed memory in the process
(`allocator`)."""
