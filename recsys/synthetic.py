"""A seeded stream of purchases for load tests: the same seed gives the same events, always.

Shape, roughly that of a gift shop: products are Zipf-popular (a few best sellers, a long tail);
users are a Zipf-active base plus new users who join as the stream goes on (each new user's first
basket comes when they join); a basket of 1-8 lines shares an invoice and a time; a share of
baskets are returns of something the user bought before (negative quantity, "C" invoice, as in the
Online Retail data). Only `random.Random(seed)` decides, so runs match across machines.

Used by the producer (`recsys produce --synthetic`), Spark's warm-up and the benches, so it lives
in recsys/: no process package imports another.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

Record = dict[str, Any]  # a `Sale` as the codec takes it (event_time in epoch ms)

START_MS = 1_291_190_400_000  # 2010-12-01T08:00:00Z, where the bundled data starts
COUNTRIES = ("United Kingdom",) * 9 + ("Germany", "France", "EIRE", "Spain", "Netherlands")


@dataclass(frozen=True)
class SyntheticSales:
    """Iterable of `events` items `(sale, None)` (the producer's item shape: a sale, no dead
    letter); iterate twice, get the same events twice."""

    users: int = 5000
    products: int = 3000
    events: int = 100_000
    seed: int = 42
    zipf_s: float = 1.1  # popularity exponent of products and of user activity
    new_user_share: float = 0.2  # users who first appear during the stream
    return_share: float = 0.1  # baskets that return one earlier purchase (~2% of lines)
    mean_gap_ms: float = 20_000.0  # mean time between baskets

    def __post_init__(self) -> None:
        if self.users < 1 or self.products < 1 or self.events < 0:
            raise ValueError("synthetic: users and products must be >= 1, events >= 0")
        if not 0 <= self.new_user_share < 1 or not 0 <= self.return_share < 1:
            raise ValueError("synthetic: shares must be in [0, 1)")

    @property
    def source_name(self) -> str:
        return f"synthetic-{self.seed}"

    def __iter__(self) -> Iterator[tuple[Record, None]]:
        rng = random.Random(self.seed)
        product_weights = list(
            itertools.accumulate(1.0 / (r**self.zipf_s) for r in range(1, self.products + 1))
        )
        # Product ranks are shuffled onto ids, so popularity is not the id order.
        product_ids = [f"P{i:05d}" for i in range(1, self.products + 1)]
        rng.shuffle(product_ids)
        prices = [round(rng.lognormvariate(1.0, 0.8), 2) for _ in range(self.products)]
        base = max(1, round(self.users * (1 - self.new_user_share)))
        user_weights = list(
            itertools.accumulate(1.0 / (r**self.zipf_s) for r in range(1, self.users + 1))
        )
        joined = base  # users 0..joined-1 exist
        bought: dict[int, list[tuple[int, int]]] = {}  # user -> recent (product, quantity)
        t = float(START_MS)
        invoice = 0
        n = 0
        prefix = self.source_name + ":"
        pick, rnd = bisect.bisect_right, rng.random
        product_total, last_product = product_weights[-1], self.products - 1
        while n < self.events:
            t += rng.expovariate(1.0 / self.mean_gap_ms)
            # New users join evenly over the first 90% of the stream, so all of them show up.
            due = min(self.users, base + (self.users - base) * n // max(1, self.events * 9 // 10))
            if joined < due:
                user = joined  # a new user's first basket
                joined += 1
            else:
                user = pick(user_weights, rnd() * user_weights[joined - 1], 0, joined - 1)
            user_id = f"U{user + 1:06d}"
            country = COUNTRIES[user % len(COUNTRIES)]
            invoice += 1
            history = bought.setdefault(user, [])
            is_return = bool(history) and rnd() < self.return_share
            lines = 1 if is_return else rng.randint(1, 8)
            for _ in range(lines):
                if n >= self.events:
                    break
                n += 1
                if is_return:
                    product, qty = history[rng.randrange(len(history))]
                    quantity = -rng.randint(1, qty)
                    invoice_id = f"C{invoice:07d}"
                else:
                    product = pick(product_weights, rnd() * product_total, 0, last_product)
                    quantity = rng.choice((1, 1, 1, 2, 2, 3, 4, 6, 12, 24))
                    invoice_id = f"S{invoice:07d}"
                    history.append((product, quantity))
                    if len(history) > 20:
                        del history[0]
                sale: Record = {
                    "event_id": prefix + str(n),
                    "user_id": user_id,
                    "product_id": product_ids[product],
                    "quantity": quantity,
                    "event_time": int(t),
                    "unit_price": prices[product],
                    "invoice_id": invoice_id,
                    "description": None,
                    "country": country,
                }
                yield sale, None
