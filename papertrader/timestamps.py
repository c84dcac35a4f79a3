"""One textual form for instants: ISO 8601 in UTC with microseconds.

Fixed width, so stored timestamps also sort correctly as text.
"""

from __future__ import annotations

from datetime import datetime, timezone


def iso(seconds: float) -> str:
    """Render POSIX seconds (as from ``IReactorTime.seconds()``) as ISO 8601 UTC."""
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="microseconds")
