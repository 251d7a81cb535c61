"""The environment a worker starts with asks glibc for huge pages, and keeps the operator's
own glibc tunables."""

from __future__ import annotations

from appliance.llm.huge_pages import huge_pages_environment


def test_a_worker_asks_for_huge_pages() -> None:
    assert huge_pages_environment({}) == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def test_the_operators_other_tunables_are_kept() -> None:
    environ = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.trim_threshold=0"}
    assert huge_pages_environment(environ) == {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.trim_threshold=0:"
        "glibc.malloc.hugetlb=1"
    }


def test_the_operators_own_huge_page_choice_wins() -> None:
    for choice in ("0", "1", "2"):
        environ = {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:glibc.malloc.hugetlb={choice}"}
        assert huge_pages_environment(environ) == {}
