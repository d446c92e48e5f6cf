"""Haystack time zone names (the city part of an IANA name: ``London``, ``New_York``; ``UTC``) to
IANA zones and back. Why a table: Haystack names are not unique across IANA's areas, so the
canonical zone (the first in sorted order among ``Area/City`` names, skipping legacy aliases)
wins, as Haystack's own tz database does."""

from __future__ import annotations

from functools import cache
from zoneinfo import ZoneInfo, available_timezones

from orchestrator.exceptions import ConfigError

_AREAS = ("Africa", "America", "Antarctica", "Asia", "Atlantic", "Australia", "Europe", "Indian", "Pacific", "Etc")


def haystack_name(iana: str) -> str:
    """``Europe/London`` -> ``London``; ``UTC`` stays ``UTC``."""
    if iana in ("UTC", "Etc/UTC", "Etc/Universal", "Universal", "Zulu", "Etc/Zulu"):
        return "UTC"
    return iana.rsplit("/", 1)[-1]


@cache
def _table() -> dict[str, str]:
    table: dict[str, str] = {}
    for name in sorted(available_timezones()):
        if name.split("/", 1)[0] not in _AREAS:
            continue
        table.setdefault(haystack_name(name), name)
    table["UTC"] = "UTC"
    return table


def zone(haystack: str) -> ZoneInfo:
    """The IANA zone of a Haystack tz name (a full IANA name is accepted too)."""
    iana = _table().get(haystack)
    if iana is None and "/" in haystack and haystack in available_timezones():
        iana = haystack
    if iana is None:
        raise ConfigError(f"unknown Haystack time zone {haystack!r}")
    return ZoneInfo(iana)


def zone_of_building(time_zone: str | None) -> ZoneInfo:
    """A building's ``time_zone`` (an IANA name in public.buildings), UTC when unset or unknown."""
    try:
        return ZoneInfo(time_zone or "UTC")
    except (ValueError, KeyError, OSError):
        return ZoneInfo("UTC")
