"""The administrator's tool, ``papertrader-admin``, and the master's admin socket it talks to."""
