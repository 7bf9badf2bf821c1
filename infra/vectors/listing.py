"""The listing's order (newest first, then by id) over engines that order a scroll by one payload field only.

Qdrant (the server and Edge alike) orders a scroll by `created_us` but leaves records of the same value in no stable
order, and such a scroll cannot start after one of them. Its plain scroll is in id order and starts at a given id,
so a page is put together from the two: the records after the cursor's own in its microsecond (a plain scroll of
that microsecond), then the older ones newest first; a microsecond that the page's end cuts through is read again in
id order, so that the next page takes up exactly where this one stops. Should fewer be left of it than the page
needs (deleted between the two scrolls), the page goes on with the older ones: a page short of its limit is the
listing's end.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

from infra.vectors.base import ImageFilter, ImageRecord, ListingPosition

# (limit, filter): the records matching the filter, created_us descending, those of one microsecond in any order
NewestFirst = Callable[[int, ImageFilter], Awaitable[list[ImageRecord]]]
# (limit, first id or None, filter): the records matching the filter in id order, from that id (inclusive)
InIdOrder = Callable[[int, str | None, ImageFilter], Awaitable[list[ImageRecord]]]


def listing_key(record: ImageRecord) -> tuple[int, uuid.UUID]:
    """A record's place in the listing: newest first, then by id as the engines order point ids (UUIDs)."""
    return -record.created_us, uuid.UUID(record.id)


async def listing_page(
    limit: int,
    after: ListingPosition | None,
    image_filter: ImageFilter | None,
    *,
    newest_first: NewestFirst,
    in_id_order: InIdOrder,
) -> list[ImageRecord]:
    """Up to `limit` records in the listing's order, strictly after `after` when given."""
    conditions = image_filter or ImageFilter()
    page: list[ImageRecord] = []
    if after is not None:
        if after.image_id is not None:
            start = uuid.UUID(after.image_id)
            tied = await in_id_order(limit + 1, str(start), conditions.at(after.created_us))
            page = [record for record in tied if uuid.UUID(record.id) > start][:limit]
        conditions = conditions.before(after.created_us)
    while len(page) < limit:
        wanted = limit - len(page)
        older = await newest_first(wanted + 1, conditions)
        if len(older) <= wanted or older[wanted].created_us != older[wanted - 1].created_us:
            return page + sorted(older[:wanted], key=listing_key)
        cut = older[wanted - 1].created_us
        whole = sorted((record for record in older if record.created_us != cut), key=listing_key)
        page += whole + await in_id_order(wanted - len(whole), None, conditions.at(cut))
        conditions = conditions.before(cut)
    return page
