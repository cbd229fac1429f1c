"""The device store (design section 4): content-addressed blobs, complete model dirs,
the `current` / `previous` links, garbage collection, recovery after a crash (`store`),
and the lock that keeps one agent per state dir (`lock`)."""
