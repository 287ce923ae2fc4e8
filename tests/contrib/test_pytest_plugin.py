"""The pytest plugin: fixtures and assertion helpers, run in pytester's own test sessions."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

USER_TESTS = """
    import durable_analytics as analytics
    import pytest

    def sign_up(user_id):
        analytics.track(user_id, "Signed Up", {"plan": "Pro", "seats": 3})
        analytics.identify(user_id, {"email": "a@example.com"})

    def test_tracked(analytics_events):
        sign_up("u1")
        message = analytics_events.assert_tracked(
            "Signed Up", user_id="u1", properties={"plan": "Pro"}
        )
        assert message["properties"]["seats"] == 3
        analytics_events.assert_sent("identify", traits={"email": "a@example.com"})
        assert analytics_events.events == ["Signed Up"]

    def test_each_test_starts_empty(analytics_events):
        analytics_events.assert_not_sent()

    def test_the_collector_is_real(analytics_client, collector):
        analytics_client.track("u2", "Viewed")
        assert analytics_client.flush(timeout=10).sent == 1
        assert collector.url.startswith("http://127.0.0.1:")
        assert [m["event"] for m in collector.messages()] == ["Viewed"]

    def test_the_tests_tmp_path_stays_empty(analytics_client, tmp_path):
        analytics_client.track("u3", "Viewed")
        assert list(tmp_path.iterdir()) == []

    def test_wrong_event_fails(analytics_events):
        sign_up("u1")
        analytics_events.assert_tracked("Signed Out")

    def test_wrong_property_fails(analytics_events):
        sign_up("u1")
        analytics_events.assert_tracked("Signed Up", properties={"plan": "Free"})

    def test_unexpected_message_fails(analytics_events):
        sign_up("u1")
        analytics_events.assert_not_sent("track")
"""


def _check(result: pytest.RunResult) -> None:
    result.assert_outcomes(passed=4, failed=3)
    out = result.stdout.str()
    # A failure says what was sent, so the user sees the difference.
    assert "expected one message matching" in out
    assert '"event": "Signed Up"' in out
    assert "expected no such message, found 1" in out


def test_the_entry_point_gives_every_test_the_fixtures(pytester: pytest.Pytester) -> None:
    """Installed, the plugin loads by itself: the fixtures and helpers pass and fail right."""
    pytester.makepyfile(test_user=USER_TESTS)
    _check(pytester.runpytest_subprocess("-p", "no:cacheprovider"))


def test_a_pytest_plugins_line_works_with_autoload_off(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With PYTEST_DISABLE_PLUGIN_AUTOLOAD, the documented conftest line loads it."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makeconftest('pytest_plugins = ["durable_analytics.pytest_plugin"]')
    pytester.makepyfile(test_user=USER_TESTS)
    _check(pytester.runpytest_subprocess())


def test_the_line_and_the_entry_point_together_register_it_once(
    pytester: pytest.Pytester,
) -> None:
    """Both at once (autoload on, and the conftest line): no 'already registered' error."""
    pytester.makeconftest('pytest_plugins = ["durable_analytics.pytest_plugin"]')
    pytester.makepyfile(test_user=USER_TESTS)
    _check(pytester.runpytest_subprocess())


def test_without_the_plugin_the_fixtures_are_missing(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: autoload off and no line, so the fixtures come from the plugin alone."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(errors=7)
    assert "fixture 'analytics_events' not found" in result.stdout.str()
