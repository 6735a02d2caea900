"""Authentication (bearer tokens) and TLS material (a private CA and server/client certificates)."""
