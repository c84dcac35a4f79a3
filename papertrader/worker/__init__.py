"""The worker server: faces clients and relays their commands to the master."""
