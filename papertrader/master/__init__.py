"""The master server: the only holder of accounts, orders and prices."""
