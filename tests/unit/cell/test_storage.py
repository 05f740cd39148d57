"""Cell ids: unique, and sorted in the order they were made, even within one second."""

from __future__ import annotations

import re
import time

from buildcell.cell.storage import new_cell_id


def test_ids_made_within_a_second_sort_in_the_order_made() -> None:
    ids = []
    for _ in range(40):
        ids.append(new_cell_id())
        time.sleep(0.002)  # more than the millisecond the id resolves
    assert all(re.fullmatch(r"\d{8}T\d{6}-[0-9a-f]{8}", i) for i in ids), ids
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
