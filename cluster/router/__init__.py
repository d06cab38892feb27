"""The router: writes to the master, reads to a random live slave."""
