"""Clients: the Twisted client library and the ``papertrader`` command line tool."""

from papertrader.client.library import PaperTraderClient, connect

__all__ = ["PaperTraderClient", "connect"]
