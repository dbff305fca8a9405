"""End-to-end tests: scripts/develop's real Home Assistant and worker, driven over HTTP."""
