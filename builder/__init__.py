"""edgefleet operator host: build, evaluate, package, sign, publish, roll out."""
