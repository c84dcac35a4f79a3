"""PaperTrader test suite."""
