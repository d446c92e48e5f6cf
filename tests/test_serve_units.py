"""The front door's pure pieces, without servers: SCRAM against RFC 7677's test vector, the login
state machine with a fake clock, Zinc and JSON against phable's own codecs (a client nobody here
wrote), filters, hisRead ranges across a DST change, ids and Haystack time zone names."""

from __future__ import annotations

import base64
import json
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import phable
import pytest
from phable.io.ph_json import ph_from_json, ph_to_json
from phable.io.ph_zinc import ph_from_zinc

from orchestrator.exceptions import InputError
from orchestrator.serve import auth, hayson, ids, ranges, scram, tz, zinc
from orchestrator.serve import filter as hfilter
from orchestrator.serve.kinds import MARKER, Col, Grid, His, Number, Ref
from orchestrator.serve.users import User

LONDON = ZoneInfo("Europe/London")


def test_scram_matches_rfc_7677_vector() -> None:
    creds = scram.derive("pencil", base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ=="), 4096)
    nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    state = scram.FirstDone("user", "n=user,r=rOprNGfwEbeRWgbNEkqO", f"r={nonce},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", nonce)
    final = f"c=biws,r={nonce},p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    answer = scram.unb64(scram.server_final(state, creds, scram.b64url(final))).decode()
    assert answer == "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    wrong = scram.derive("pencil2", creds.salt, 4096)
    with pytest.raises(scram.AuthFailed, match="wrong password"):
        scram.server_final(state, wrong, scram.b64url(final))
    assert scram.check_password(creds, "pencil") and not scram.check_password(creds, "Pencil")


def test_login_tokens_expire_and_removed_users_lose_access() -> None:
    now = [1000.0]
    known: dict[str, tuple[User, scram.Credentials]] = {
        "ann": (User("ann", "write"), scram.derive("secret-pass", iterations=1000))
    }
    a = auth.Authenticator(lambda name: known.get(name), clock=lambda: now[0])
    assert a.password("ann", "secret-pass") == User("ann", "write")
    assert a.password("ann", "wrong") is None and a.password("bob", "secret-pass") is None
    token = a.issue(User("ann", "write"))
    assert a.bearer(token) == User("ann", "write")
    known["ann"] = (User("ann", "read"), known["ann"][1])
    now[0] += auth.RECHECK_S + 1
    assert a.bearer(token) == User("ann", "read")  # rights re-read from the catalog
    del known["ann"]
    now[0] += auth.RECHECK_S + 1
    assert a.bearer(token) is None  # removed: the token is dropped
    known["ann"] = (User("ann", "read"), scram.derive("secret-pass", iterations=1000))
    old = a.issue(User("ann", "read"))
    now[0] += auth.TOKEN_TTL_S + 1
    assert a.bearer(old) is None
    assert isinstance(a.handshake("SCRAM handshakeToken=nope, data=eA"), auth.Denied)
    hello = a.handshake(f"HELLO username={scram.b64url('nobody')}")
    assert isinstance(hello, auth.Challenge) and "hash=SHA-256" in hello.www_authenticate  # unknown users look alike


def _sample() -> Grid:
    when = datetime(2023, 3, 26, 3, 30, tzinfo=LONDON)
    return Grid.of(
        [
            {"id": Ref("pt:b0:electricity", "b0 electricity"), "point": MARKER, "his": MARKER, "tz": "London",
             "val": Number(12.5, "kWh"), "ts": when, "day": date(2023, 3, 26), "dis": 'quote " and \\ and\nnewline'},
            {"id": Ref("site:b0"), "site": MARKER, "area": Number(3296.5, "m²"), "n": Number(-3.0)},
        ],
        {"hisStart": when},
    )  # fmt: skip


def test_zinc_and_json_read_by_phable_and_back() -> None:
    grid = _sample()
    theirs = ph_from_zinc(zinc.encode_grid(grid))
    assert theirs.rows[0]["id"] == phable.Ref("pt:b0:electricity", "b0 electricity")
    assert theirs.rows[0]["val"] == phable.Number(12.5, "kWh")
    assert theirs.rows[0]["ts"] == datetime(2023, 3, 26, 3, 30, tzinfo=LONDON)
    assert theirs.rows[0]["dis"] == grid.rows[0]["dis"]
    assert theirs.rows[1]["area"] == phable.Number(3296.5, "m²")
    as_json = ph_from_json(hayson.grid_to_json(grid))
    assert as_json.rows == theirs.rows

    # what phable sends (hisWrite), read by our decoders
    rows = [{"ts": datetime(2023, 1, 1, h, tzinfo=UTC), "val": phable.Number(1.0 + h, "kWh")} for h in range(3)]
    sent = phable.Grid.to_grid(rows, {"id": phable.Ref("pt:b0:electricity")})
    encoded = ph_to_json(sent)
    ours = hayson.decode_grid(encoded if isinstance(encoded, str) else json.dumps(encoded))
    assert ours.meta["id"] == Ref("pt:b0:electricity")
    assert [(r["ts"], r["val"]) for r in ours.rows] == [(r["ts"], Number(r["val"].val, "kWh")) for r in rows]
    back = zinc.decode_grid(zinc.encode_grid(grid))
    assert back.rows == grid.rows and [c.name for c in back.cols] == [c.name for c in grid.cols]


def test_zinc_errors_name_line_and_column() -> None:
    with pytest.raises(InputError) as err:
        zinc.decode_grid('ver:"3.0"\nid,val\n@a,1kWh\n@b,"open\n')
    assert "request:4" in str(err.value)


def test_filters_parse_and_match() -> None:
    # tags as jsonb holds them (refs as text, markers as true, numbers with units as objects)
    tags = {"id": "pt:b0:e", "point": True, "his": True, "siteRef": "site:b0", "area": {"val": 120.0, "unit": "m²"},
            "dis": "b0 electricity"}  # fmt: skip
    site = {"id": "site:b0", "site": True, "dis": "Main"}
    lookup = {"site:b0": site}
    for text, want in [
        ("point and his", True),
        ("point and not his", False),
        ("siteRef == @site:b0", True),
        ('siteRef->dis == "Main"', True),
        ("area > 100m²", True),
        ("area < 100", False),
        ('site or (point and dis == "b0 electricity")', True),
        ("equip", False),
    ]:
        assert hfilter.matches(hfilter.parse(text), tags, lookup) is want, text
    with pytest.raises(InputError):
        hfilter.parse("point and")


def test_his_read_ranges_in_the_points_zone() -> None:
    now = datetime(2023, 3, 27, 9, 0, tzinfo=UTC)
    y = ranges.parse("yesterday", LONDON, now)
    assert (y.start, y.end) == (datetime(2023, 3, 26, tzinfo=LONDON), datetime(2023, 3, 27, tzinfo=LONDON))
    assert y.end is not None and y.end.astimezone(UTC) - y.start.astimezone(UTC) == timedelta(hours=23)  # clocks forward
    assert ranges.parse("today", LONDON, now).start == datetime(2023, 3, 27, tzinfo=LONDON)
    span = ranges.parse("2023-01-01,2023-01-31", LONDON, now)
    assert (span.start, span.end) == (datetime(2023, 1, 1, tzinfo=LONDON), datetime(2023, 2, 1, tzinfo=LONDON))
    dt = ranges.parse("2023-06-01T00:00:00Z UTC,2023-06-01T03:00:00+01:00 London", LONDON, now)
    assert dt.end is not None and dt.end.astimezone(UTC) - dt.start.astimezone(UTC) == timedelta(hours=2)
    open_ended = ranges.parse("2023-06-01T00:00:00Z UTC", LONDON, now)
    assert open_ended.end is None
    for bad in ("2023-02-01,2023-01-01", "last week", "2023-01-01,2023-01-02T00:00:00Z UTC"):
        with pytest.raises(InputError):
            ranges.parse(bad, LONDON, now)


def test_ids_and_time_zone_names() -> None:
    for code in ("b0", "Main Hall/2", "é"):
        ref = ids.point_id(code, "gas meter")
        key = ids.parse_point(ref)
        assert key is not None and (key.building, key.meter) == (code, "gas meter")
        assert ids.parse_site(ids.site_id(code)) == code
    assert ids.parse_point("site:b0") is None
    assert tz.haystack_name("Europe/London") == "London" and tz.zone("London") == LONDON
    assert tz.haystack_name("Etc/UTC") == "UTC" and tz.zone("New_York") == ZoneInfo("America/New_York")


def test_error_grid_columns() -> None:
    g = Grid({"ver": "3.0"}, (Col("a", {}),), ({"a": 1},))
    assert zinc.encode_grid(g).splitlines()[1] == "a"


@pytest.mark.parametrize("zone", ["Europe/London", "UTC", "America/St_Johns"])
def test_his_fast_encoders_write_the_same_text_as_the_general_ones(zone: str) -> None:
    z = ZoneInfo(zone)
    start = datetime(2023, 3, 25, 22, tzinfo=UTC)  # across London's spring change
    series = [(start + timedelta(hours=h), v) for h, v in enumerate([1.5, 2.0, 0.0, -3.25, 1e-7, 123456.0, 7.1])]
    series.append((start + timedelta(hours=7, microseconds=250_000), 1.0))
    his = His.of({"id": Ref("pt:b0:electricity", "b0 electricity"), "hisStart": start.astimezone(z)}, z, "kWh", series)
    assert zinc.encode_his(his) == zinc.encode_grid(his.grid())
    assert hayson.encode_his(his) == hayson.encode_grid(his.grid())
    assert [r["ts"] for r in ph_from_json(json.loads(hayson.encode_his(his))).rows] == [ts for ts, _ in series]
