"""PaperTrader: practise trading stocks with fake money."""

__version__ = "0.1.0"
