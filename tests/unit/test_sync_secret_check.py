"""`SecretCheck` and `plan_exchange(min_sites=)`: when a site gives up on its own secret, and what counts."""

from __future__ import annotations

import pytest

from atoll.errors import AtollError
from atoll.sync.agreement import WRONG_SECRET_EXCHANGES, SecretCheck, plan_exchange
from atoll.sync.envelope import Header


def test_a_site_that_authenticates_nobody_stops_after_two_exchanges_in_a_row() -> None:
    check = SecretCheck()
    check.observe([True, False], own=0, site="mallory")
    check.observe([True], own=0, site="mallory")  # alone in the quorum: neither counts nor resets
    with pytest.raises(AtollError, match=r"^site mallory: .* 2 exchange\(s\) in a row.* ATOLL_RUN_SECRET_FILE"):
        check.observe([False, True, False], own=1, site="mallory")
    assert WRONG_SECRET_EXCHANGES == 2


def test_at_the_end_one_refused_exchange_names_the_secret() -> None:
    # A late joiner refused once, whose peers then finished: the secret is what to fix.
    check = SecretCheck()
    check.check_at_end("mallory")  # nothing seen: no verdict
    check.observe([True, False], own=0, site="mallory")
    with pytest.raises(AtollError, match=r"^site mallory: .* 1 exchange\(s\) in a row, and none ever did"):
        check.check_at_end("mallory")
    check.observe([True, True], own=0, site="mallory")
    check.observe([True, False], own=0, site="mallory")
    check.check_at_end("mallory")  # it authenticated a peer once: its secret is the run's


def test_a_site_that_ever_authenticated_a_peer_never_gives_up() -> None:
    check = SecretCheck()
    check.observe([True, True], own=0, site="east")
    for _ in range(5):  # an impostor alone with it, round after round
        check.observe([True, False], own=0, site="east")
    assert check.trusted and check.refused_in_a_row == 5


def test_one_refusal_between_authenticated_exchanges_is_forgiven() -> None:
    check = SecretCheck()
    check.observe([False, True], own=1, site="west")  # an altered payload
    check.observe([True, True], own=1, site="west")
    assert check.trusted and check.refused_in_a_row == 0


def test_refusals_of_an_outsider_say_nothing_about_the_sites_own_secret() -> None:
    # An impostor ("mallory", in no topology of the run) reaches the quorum before west: east
    # refuses it twice, but keeps its secret; west's refusal would count.
    check = SecretCheck(members=frozenset({"east", "west"}))
    for _ in range(3):
        check.observe([True, False], own=0, site="east", claims=[None, "mallory"])
    assert not check.trusted and check.refused_in_a_row == 0
    check.observe([True, False], own=0, site="east", claims=[None, "west"])
    with pytest.raises(AtollError, match=r"^site east: .* 2 exchange\(s\) in a row"):
        check.observe([True, False, False], own=0, site="east", claims=[None, "mallory", "west"])


def header(site: str) -> Header:
    return Header(site, "10.0.0.1", 0, 3, 1.0, 0, bytes(32))


def test_refused_sites_do_not_count_toward_min_sites() -> None:
    headers = [header("east"), None, header("west")]
    assert plan_exchange(headers, min_sites=3) is None
    plan = plan_exchange(headers, min_sites=2)
    assert plan is not None and plan.in_sync == [0, 2]
