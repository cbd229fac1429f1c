"""Releases: the operator's TUF repository (`repository`) and the embedded static server
for its `www/` tree (`server`)."""
